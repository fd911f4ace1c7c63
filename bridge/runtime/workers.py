"""A thread per transport, joined to the engine by one-frame slots where the newest frame wins.

A source thread reads as fast as its source delivers and leaves the newest frame in the input
slot; a sink thread writes whatever the engine last produced. Neither ever waits on the engine,
and the engine never waits on a sink: a slow neighbour costs dropped frames, never latency.
"""

from __future__ import annotations

import logging
import math
import threading
from collections import deque
from collections.abc import Callable

from bridge.io import Frame, Sink, Source, TransportError
from bridge.io.slot import FrameSlot

from .metrics import Metrics

log = logging.getLogger("sd_bridge")

RETRY_FIRST = 0.1
RETRY_MAX = 1.0


def join_while_progressing(
    thread: threading.Thread, progress: Callable[[], int], stall_seconds: float
) -> bool:
    """Wait for `thread` to end for as long as `progress()` (a count it raises as it works)
    keeps rising from one wait of `stall_seconds` to the next; True if it ended."""
    seen = -1
    while thread.is_alive() and progress() != seen:
        seen = progress()
        thread.join(stall_seconds)
    return not thread.is_alive()


class CountingSlot(FrameSlot):
    """A frame slot that counts frames replaced before anyone took them."""

    def __init__(self, on_drop: Callable[[], None]) -> None:
        super().__init__()
        self._on_drop = on_drop
        self._unread = False
        self._flag = threading.Lock()

    def put(self, frame: Frame) -> None:
        with self._flag:
            if self._unread:
                self._on_drop()
            self._unread = True
        super().put(frame)

    def has_unread(self) -> bool:
        """True while a frame waits to be taken."""
        with self._flag:
            return self._unread

    def take(self, timeout: float) -> Frame | None:
        frame = super().take(timeout)
        if frame is not None:
            with self._flag:
                self._unread = False
        return frame


class FrameQueue:
    """A bounded queue for sinks that keep every frame; when full, the oldest frame is dropped."""

    def __init__(self, on_drop: Callable[[], None], capacity: int = 120) -> None:
        self._frames: deque[Frame] = deque()
        self._capacity = capacity
        self._on_drop = on_drop
        self._condition = threading.Condition()

    def put(self, frame: Frame) -> None:
        with self._condition:
            if len(self._frames) >= self._capacity:
                self._frames.popleft()
                self._on_drop()
            self._frames.append(frame)
            self._condition.notify()

    def take(self, timeout: float) -> Frame | None:
        with self._condition:
            if not self._frames:
                self._condition.wait(max(timeout, 0.0))
            return self._frames.popleft() if self._frames else None

    def has_unread(self) -> bool:
        with self._condition:
            return bool(self._frames)


class SourceWorker(threading.Thread):
    """Reads a source into a slot; reopens it with back-off when it fails or goes away."""

    def __init__(self, source: Source, slot: FrameSlot, stop: threading.Event) -> None:
        super().__init__(name=f"source {source.describe()}", daemon=True)
        self.source = source
        self.slot = slot
        self.stop_event = stop
        self.failures = 0

    def run(self) -> None:
        delay = RETRY_FIRST
        while not self.stop_event.is_set():
            try:
                if not self.source.is_open:
                    self.source.open()
                frame = self.source.read(timeout=0.1)
            except (TransportError, OSError, ValueError) as error:
                self.failures += 1
                if self.failures == 1 or self.failures % 50 == 0:
                    log.warning("input %s failed: %s", self.source.describe(), error)
                self._close_quietly()
                self.stop_event.wait(delay)
                delay = min(delay * 2, RETRY_MAX)
                continue
            delay = RETRY_FIRST
            if frame is not None:
                self.slot.put(frame)
        self._close_quietly()

    def _close_quietly(self) -> None:
        try:
            self.source.close()
        except (TransportError, OSError) as error:
            log.debug("closing %s: %s", self.source.describe(), error)


class SinkWorker(threading.Thread):
    """Writes the newest output frame to one sink; a failing sink never stops the others.

    Setting `finish` ends the thread once every frame already handed over is written (a
    failing sink gives up at once instead of retrying), then closes the sink: a clean stop
    loses no frame of a recording.
    """

    def __init__(self, sink: Sink, metrics: Metrics, finish: threading.Event) -> None:
        super().__init__(name=f"sink {sink.describe()}", daemon=True)
        self.sink = sink
        self.metrics = metrics
        self.finish = finish
        drop = lambda: metrics.count(drops=1)  # noqa: E731
        self.slot = FrameQueue(drop) if sink.keeps_every_frame else CountingSlot(drop)
        self.written = 0
        self._newest_capture = -math.inf

    def run(self) -> None:
        delay = RETRY_FIRST
        while True:
            finishing = self.finish.is_set()
            frame = self.slot.take(timeout=0.0 if finishing else 0.1)
            if frame is None:
                if finishing:
                    break
                continue
            try:
                if not self.sink.is_open:
                    self.sink.open()
                self.sink.write(frame)
            except (TransportError, OSError, ValueError) as error:
                self.metrics.count(sink_errors=1)
                log.warning("output %s failed: %s", self.sink.describe(), error)
                self._close_quietly()
                if self.finish.wait(delay):
                    break
                delay = min(delay * 2, RETRY_MAX)
                continue
            delay = RETRY_FIRST
            self.written += 1
            # A frame held while the input is gone shows a moment already shown: it counts
            # once in the latency statistics, when it was new.
            if frame.capture_time > self._newest_capture:
                self._newest_capture = frame.capture_time
                self.metrics.delivered(frame.capture_time)
        self._close_quietly()

    def _close_quietly(self) -> None:
        try:
            self.sink.close()
        except (TransportError, OSError) as error:
            log.debug("closing %s: %s", self.sink.describe(), error)
