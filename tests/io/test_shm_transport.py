"""shm: as a Source and a Sink: frames, sizes and errors through the transport interface."""

from __future__ import annotations

import numpy as np
import pytest

from bridge.io import Frame, TransportError, open_sink, open_source
from bridge.io.shm import DUE_EARLY, DUE_POLL_INTERVAL, MAX_PERIOD, POLL_INTERVAL, ShmSource


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


def test_a_source_looks_often_only_while_the_next_frame_is_due():
    source = ShmSource("polls", 8, 8)
    assert source._poll_interval(5.0) == POLL_INTERVAL  # no period learnt yet
    for arrival in (10.0, 10.02, 10.04):  # a writer at 50 fps
        source._learn_period(arrival)
    due = 10.06
    assert source._poll_interval(10.041) == POLL_INTERVAL  # just after a frame
    # Sleeps up to the moment the next frame may come, not past it ...
    assert source._poll_interval(due - DUE_EARLY - 0.0004) == pytest.approx(0.0004)
    # ... then looks often until it comes, also when it is a little late ...
    assert source._poll_interval(due - DUE_EARLY / 2) == DUE_POLL_INTERVAL
    assert source._poll_interval(due + 0.015) == DUE_POLL_INTERVAL
    # ... and goes back to sleeping longer when a whole period passed without one.
    assert source._poll_interval(due + 0.025) == POLL_INTERVAL
    source._learn_period(due + 2 * MAX_PERIOD)  # a writer that paused: its gap is no period
    assert source._poll_interval(due + 2 * MAX_PERIOD + 0.001) == POLL_INTERVAL
