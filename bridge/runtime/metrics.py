"""Counters and timings of a running bridge, read once a second for the status line and OSC."""

from __future__ import annotations

import statistics
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from bridge.io import now


@dataclass(frozen=True)
class Status:
    """One report: rates over the last window, totals since start.

    `first_frame_s` is how long the bridge took from its start to its first frame out (None
    before that frame, or when the start was not given).
    """

    fps: float
    latency_ms: float
    latency_p99_ms: float
    gpu_ms: float
    frames: int
    drops: int
    skips: int
    sink_errors: int
    first_frame_s: float | None = None

    def line(self) -> str:
        """The one-line status shown once a second."""
        return (
            f"{self.fps:6.1f} fps | latency {self.latency_ms:6.1f} ms"
            f" (p99 {self.latency_p99_ms:.1f}) | step {self.gpu_ms:5.1f} ms"
            f" | frames {self.frames} | drops {self.drops} | skips {self.skips}"
        )


class Metrics:
    """Thread-safe: the engine records frames, sink threads record deliveries and drops.

    Given `started` (seconds on `bridge.io.now`), the first frame recorded sets
    `first_frame_s` and is told once to `on_first_frame`.
    """

    def __init__(
        self,
        window: int = 240,
        *,
        started: float | None = None,
        on_first_frame: Callable[[float], None] | None = None,
    ) -> None:
        self._lock = threading.Lock()
        self._started = started
        self._on_first_frame = on_first_frame
        self.first_frame_s: float | None = None
        self._done_at: deque[float] = deque(maxlen=window)
        self._latencies: deque[float] = deque(maxlen=window)
        self._step_times: deque[float] = deque(maxlen=window)
        self.frames = 0
        self.latency_samples = 0
        self.drops = 0
        self.skips = 0
        self.sink_errors = 0

    def frame_done(self, step_seconds: float, frames: int = 1) -> None:
        """The engine produced `frames` frames in one step that took `step_seconds`.

        A step's time is what it added to the GPU's timeline (see runtime/delivery.py): from its
        launch, or from the end of the step before when it was queued behind it.
        """
        with self._lock:
            self.frames += frames
            done = now()
            self._done_at.extend([done] * frames)
            self._step_times.append(step_seconds)
            first = self.first_frame_s is None and self._started is not None
            if first:
                self.first_frame_s = done - self._started
        if first and self._on_first_frame is not None:
            self._on_first_frame(self.first_frame_s)

    def delivered(self, capture_time: float) -> None:
        """A sink wrote a new frame captured at `capture_time` (seconds on `bridge.io.now`).

        Call it once per capture: a frame shown again is no new latency sample.
        """
        with self._lock:
            self.latency_samples += 1
            self._latencies.append(now() - capture_time)

    def count(self, *, drops: int = 0, skips: int = 0, sink_errors: int = 0) -> None:
        """Add to the totals."""
        with self._lock:
            self.drops += drops
            self.skips += skips
            self.sink_errors += sink_errors

    def status(self) -> Status:
        """Rates over the recent window and totals so far."""
        with self._lock:
            done = list(self._done_at)
            latencies = sorted(self._latencies)
            steps = list(self._step_times)
            totals = (self.frames, self.drops, self.skips, self.sink_errors)
            first_frame = self.first_frame_s
        fps = (
            (len(done) - 1) / (done[-1] - done[0]) if len(done) > 1 and done[-1] > done[0] else 0.0
        )
        median = statistics.median(latencies) if latencies else 0.0
        p99 = latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))] if latencies else 0.0
        step = statistics.median(steps) if steps else 0.0
        return Status(fps, median * 1000, p99 * 1000, step * 1000, *totals, first_frame)
