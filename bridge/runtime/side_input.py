"""Inputs beside the main one, such as a control image or a style picture, where the newest wins.

A side input has its own source thread, as the main input does, and a one-frame slot. The engine
looks at it between two frames and never waits for it: `poll` returns a frame only when a new one
has arrived. When frames stop coming, the last one stays in use, and that is said once; when they
come back, that is said once too.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

from bridge.io import Frame, Source, now

from .workers import CountingSlot, SourceWorker

JOIN_SECONDS = 1.0


class SideInput:
    """The newest frame of a second source, for a `role` such as "control input 0".

    `say(sentence)` reports a change of state (gone, back); `loss_after` is how long without a
    frame counts as gone once frames have come.
    """

    def __init__(
        self,
        role: str,
        source: Source,
        *,
        say: Callable[[str], None],
        loss_after: float = 1.0,
    ) -> None:
        self.role = role
        self.source = source
        self.loss_after = loss_after
        self.frames = 0
        self.replaced = 0
        self.latest: Frame | None = None
        self._say = say
        self._slot = CountingSlot(self._count_replaced)
        self._worker: SourceWorker | None = None
        self._last_at = now()
        self._gone = False

    def start(self, stop: threading.Event) -> None:
        """Start reading the source on its own thread until `stop` is set."""
        self._worker = SourceWorker(self.source, self._slot, stop)
        self._last_at = now()
        self._worker.start()

    def poll(self) -> Frame | None:
        """The frame that arrived since the last poll, or None; never waits."""
        frame = self._slot.take(timeout=0.0)
        if frame is None:
            if (
                not self._gone
                and self.latest is not None
                and now() - self._last_at > self.loss_after
            ):
                self._gone = True
                self._say(f"{self.role} {self.source.describe()} is gone; keeping its last frame.")
            return None
        if self._gone:
            self._gone = False
            self._say(f"{self.role} {self.source.describe()} is back.")
        self._last_at = now()
        self.frames += 1
        self.latest = frame
        return frame

    @property
    def gone(self) -> bool:
        """True while frames had come and then stopped for longer than `loss_after`."""
        return self._gone

    def join(self, timeout: float = JOIN_SECONDS) -> None:
        """Wait for the source thread to end (after `stop` was set), at most `timeout` seconds."""
        if self._worker is not None:
            self._worker.join(timeout)

    def _count_replaced(self) -> None:
        self.replaced += 1
