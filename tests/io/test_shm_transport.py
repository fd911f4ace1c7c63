"""shm: as a Source and a Sink: frames, sizes and errors through the transport interface."""

from __future__ import annotations

import numpy as np
import pytest

from bridge.io import Frame, TransportError, open_sink, open_source


def test_frames_cross_from_sink_to_source_with_capture_time(shm_name):
    with (
        open_sink(f"shm:{shm_name}", width=16, height=8) as sink,
        open_source(f"shm:{shm_name}", width=16, height=8) as source,
    ):
        pixels = np.random.default_rng(1).integers(0, 256, (8, 16, 4), dtype=np.uint8)
        sink.write(Frame(pixels, "bgra", 42.25, 0))
        frame = source.read(timeout=5.0)
        assert source.connected and sink.connected
        assert source.read(timeout=0.02) is None  # nothing new
    assert frame.pixel_format == "bgra" and frame.capture_time == 42.25
    assert np.array_equal(frame.pixels, pixels)
    assert frame.index == 1


def test_source_fits_frames_of_another_size(shm_name):
    with (
        open_sink(f"shm:{shm_name}", width=64, height=32) as sink,
        open_source(f"shm:{shm_name}", width=16, height=16) as source,
    ):
        sink.write(Frame(np.full((32, 64, 3), 50, np.uint8), "rgb", 0.0, 0))
        frame = source.read(timeout=5.0)
    assert frame.pixels.shape == (16, 16, 3) and np.all(frame.pixels == 50)


def test_second_sink_on_a_live_name_is_a_transport_error(shm_name):
    with open_sink(f"shm:{shm_name}", width=8, height=8):
        with pytest.raises(TransportError, match="already used by a live writer"):
            open_sink(f"shm:{shm_name}", width=8, height=8)


def test_source_without_a_writer_waits_and_reports_disconnected(shm_name):
    with open_source(f"shm:{shm_name}", width=8, height=8) as source:
        assert source.read(timeout=0.05) is None
        assert not source.connected
        assert "waiting for a writer" in source.describe()


def test_bad_name_is_refused_with_the_naming_rule():
    with pytest.raises(ValueError, match="use 1 to 20 characters"):
        open_sink("shm:TouchDesigner output", width=8, height=8)
