"""Choosing transports by URI, and what `sd-bridge list` learns about this machine."""

from __future__ import annotations

import sys

import numpy as np
import pytest

from bridge.io import (
    SCHEMES,
    Frame,
    available_transports,
    enumerate_devices,
    open_sink,
    open_source,
    parse_uri,
)
from bridge.io.null import NullSink
from bridge.io.pattern import PatternSource
from bridge.io.shm_protocol import ShmWriter


def test_uri_splits_into_scheme_target_and_options():
    parsed = parse_uri("FILE:clips/a b.mp4?fps=24&codec=mpeg4")
    assert (parsed.scheme, parsed.target, parsed.options) == (
        "file",
        "clips/a b.mp4",
        {"fps": "24", "codec": "mpeg4"},
    )
    assert parse_uri("null").target == ""
    assert parse_uri("file:///tmp/x.mp4").target == "/tmp/x.mp4"
    assert parse_uri(r"file:C:\clips\a.mp4").target == r"C:\clips\a.mp4"
    assert parse_uri("spout:").target == ""


def test_unknown_scheme_lists_every_known_one():
    with pytest.raises(ValueError) as refused:
        parse_uri("rtsp://camera.local/stream")
    message = str(refused.value)
    assert message.startswith("Unknown transport 'rtsp'")
    assert message.endswith(f"transports are {', '.join(SCHEMES)}.")
    assert set(SCHEMES) == set("spout cam vcam shm file pattern null ndi syphon".split())


def test_an_unknown_input_lists_only_the_schemes_that_can_be_inputs():
    with pytest.raises(ValueError) as refused:
        open_source("rtsp://camera.local/stream", width=8, height=8)
    assert str(refused.value) == (
        "Unknown source 'rtsp' in 'rtsp://camera.local/stream'; "
        "sources are spout, cam, shm, file, pattern, ndi, syphon."
    )
    with pytest.raises(ValueError) as refused:
        open_sink("screen:1", width=8, height=8)
    assert str(refused.value).endswith("sinks are spout, vcam, shm, file, null, ndi, syphon.")


def test_source_only_and_sink_only_schemes_say_which_ones_fit():
    with pytest.raises(ValueError, match="'pattern' cannot be a sink; sinks are spout, vcam"):
        open_sink("pattern:bars", width=8, height=8)
    with pytest.raises(ValueError, match="'null' cannot be a source; sources are spout, cam"):
        open_source("null", width=8, height=8)


def test_options_are_checked_per_scheme():
    with pytest.raises(ValueError, match="Option 'speed' is not understood by pattern: as a"):
        open_source("pattern:bars?speed=2", width=8, height=8)
    with pytest.raises(ValueError, match="fps='fast' must be a positive number"):
        open_source("pattern:bars?fps=fast", width=8, height=8)
    with pytest.raises(ValueError, match="not key=value pairs"):
        parse_uri("pattern:bars?fps")


def test_missing_targets_are_asked_for_with_an_example():
    with pytest.raises(ValueError, match=r"shm: needs a name, e\.g\. shm:td-out\."):
        open_source("shm:", width=8, height=8)
    with pytest.raises(ValueError, match=r"file: needs a path, e\.g\. file:out\.mp4\."):
        open_sink("file:", width=8, height=8)


def test_pattern_is_the_default_kind_and_its_fps_option_applies():
    with open_source("pattern:?fps=12", width=16, height=8) as source:
        assert isinstance(source, PatternSource)
        assert (source.kind, source.fps) == ("bars", 12.0)
        assert source.read(timeout=1.0).pixels.shape == (8, 16, 3)


def test_null_sink_counts_and_discards():
    with open_sink("null", width=8, height=8) as sink:
        assert isinstance(sink, NullSink) and sink.connected
        for index in range(3):
            sink.write(Frame(np.zeros((8, 8, 3), np.uint8), "rgb", 0.0, index))
        assert sink.frames_written == 3
    assert not sink.connected


def test_every_transport_is_listed_with_whether_it_works_here():
    infos = {info.name: info for info in available_transports()}
    assert list(infos) == list(SCHEMES)
    assert infos["pattern"].usable and infos["pattern"].source and not infos["pattern"].sink
    assert infos["null"].sink and not infos["null"].source
    assert infos["shm"].source and infos["shm"].sink and infos["shm"].usable
    if sys.platform != "win32":
        assert not infos["spout"].usable and "Windows-only" in infos["spout"].reason
    for info in infos.values():
        assert info.usable or info.reason


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="shm listing reads /dev/shm")
def test_live_shared_memory_streams_are_enumerated(shm_name):
    with ShmWriter(shm_name, 24, 16, "bgra") as writer:
        writer.write(np.zeros((16, 24, 4), np.uint8))
        devices = {device.uri: device for device in enumerate_devices(max_cameras=0)}
    found = devices[f"shm:{shm_name}"]
    assert found.kind == "shm stream"
    assert found.description.startswith("24x16 bgra, writer pid")
