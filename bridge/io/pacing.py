"""Pacing for sources that could run faster than real time (patterns, files)."""

from __future__ import annotations

import time

from bridge.io.frame import now


class Pacer:
    """Releases one tick every 1/fps seconds; a late caller skips ticks rather than bursting."""

    def __init__(self, fps: float) -> None:
        if not fps > 0:
            raise ValueError(f"Frame rate must be positive; got {fps}.")
        self._period = 1.0 / fps
        self._due: float | None = None

    def wait(self, timeout: float) -> bool:
        """Sleep until the next tick and return True, or return False after `timeout` seconds."""
        current = now()
        if self._due is None:
            self._due = current
        delay = self._due - current
        if delay > timeout:
            time.sleep(max(timeout, 0.0))
            return False
        if delay > 0:
            time.sleep(delay)
        following = self._due + self._period
        current = now()
        # More than one period late: restart the grid rather than firing the missed ticks at once.
        self._due = following if following > current else current + self._period
        return True
