"""A side input hands over its newest frame without waiting and says once when it goes and comes."""

from __future__ import annotations

import threading
import time

from bridge.io import Frame
from bridge.runtime.side_input import SideInput
from tests.runtime.helpers import FedSource


def fed_depth() -> FedSource:
    """A control input that hands out exactly the 8x8 frames a test puts in."""
    return FedSource(8, "fed:depth")


def poll_until_frame(side: SideInput) -> Frame:
    for _ in range(500):
        frame = side.poll()
        if frame is not None:
            return frame
        time.sleep(0.01)
    raise AssertionError("the side input never delivered the frame fed to it")


def test_side_input_keeps_the_newest_frame_and_reports_loss_and_return_once() -> None:
    said: list[str] = []
    source = fed_depth()
    side = SideInput("control input 0", source, say=said.append, loss_after=0.0)
    stop = threading.Event()
    side.start(stop)
    try:
        assert side.poll() is None and said == []  # nothing came yet: not "gone"
        source.feed()
        first = poll_until_frame(side)
        assert first.index == 0 and side.latest is first
        assert side.poll() is None and side.poll() is None
        assert said == ["control input 0 fed:depth is gone; keeping its last frame."]
        assert side.gone and side.latest is first
        source.feed()
        assert poll_until_frame(side).index == 1
        assert said[1:] == ["control input 0 fed:depth is back."] and not side.gone
        assert side.frames == 2
    finally:
        stop.set()
        side.join()
