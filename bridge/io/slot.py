"""A one-frame hand-over between a device thread and its reader: the newest frame wins."""

from __future__ import annotations

import threading

from bridge.io.frame import Frame


class FrameSlot:
    """Holds at most one frame; `put` replaces a frame nobody took yet."""

    def __init__(self) -> None:
        self._condition = threading.Condition()
        self._frame: Frame | None = None

    def put(self, frame: Frame) -> None:
        """Store `frame`, replacing any frame nobody took."""
        with self._condition:
            self._frame = frame
            self._condition.notify_all()

    def take(self, timeout: float) -> Frame | None:
        """Remove and return the stored frame, waiting up to `timeout` seconds for one.

        A waiting `take` returns the moment a frame is put: the timeout only bounds how long it
        waits when none comes.
        """
        with self._condition:
            if self._frame is None:
                self._condition.wait(max(timeout, 0.0))
            frame, self._frame = self._frame, None
            return frame
