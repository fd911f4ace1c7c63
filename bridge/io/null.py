"""`null`: a sink that discards frames, for benchmarks."""

from __future__ import annotations

from bridge.io.base import Sink
from bridge.io.frame import Frame


class NullSink(Sink):
    """Counts frames and throws them away."""

    def __init__(self) -> None:
        super().__init__()
        self.frames_written = 0

    @property
    def connected(self) -> bool:
        return self.is_open

    def describe(self) -> str:
        return "null"

    def _open(self) -> None:
        self.frames_written = 0

    def _close(self) -> None:
        pass

    def _write(self, frame: Frame) -> None:
        self.frames_written += 1
