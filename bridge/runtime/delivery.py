"""Finished frames go to the sinks the moment the GPU is done with them.

The engine launches a step and goes back to its input at once; a delivery thread waits on the
step's completion (the event recorded after its download, see transfer.py) and hands its frames
to the sinks. A frame never waits for the next frame to be launched, which with a paced input
would cost a whole input period (16.7 ms at 60 fps).

The engine may launch the next step while one is still on the GPU, so that the GPU finds its
next work queued when it comes free. Launched too early, though, the next step only waits on
the GPU behind the running one, and its input frame ages meanwhile. So while a step runs, the
engine launches the next one when the running one is about to end (`wait_for_launch`): at its
expected end, from the recent time per step, less what a launch takes on the host and a margin.
With input faster than the GPU, each step starts on the GPU as the one before it ends, on an
input frame taken just before; with slower input the GPU is idle when a frame comes, and the
frame is launched at once. At most `MAX_IN_FLIGHT` steps are undelivered at any time.

One thread delivers, oldest step first, so the sinks see frames in launch order. On stop,
`finish` delivers every step already launched before the engine lets the sinks finish.
"""

from __future__ import annotations

import logging
import math
import statistics
import threading
from collections import deque
from collections.abc import Callable

from bridge.io import now

from .transfer import MAX_IN_FLIGHT, PendingFrames
from .workers import join_while_progressing

log = logging.getLogger("sd_bridge")

# Recent steps the launch timing learns from; the median of a short window follows a change
# of settings within a few frames and ignores the odd slow one.
WINDOW = 16
# Launch this much earlier than the host needs: a launch that runs a little slow then still
# finds the GPU busy. An idle GPU costs throughput; a frame waiting a millisecond costs little.
LAUNCH_MARGIN = 0.001
# How long the delivery thread sleeps between two looks while nothing is launched.
IDLE_WAIT = 0.1


class Delivery:
    """A thread that hands each launched step's frames on as soon as the GPU finishes it.

    `deliver(pending, step_seconds)` runs on that thread once per step, in launch order, after
    the step's pixels reached the host. `step_seconds` is the time the step added to the GPU's
    timeline: from its launch, or from the end of the step before when it had to wait for it.
    An exception in `deliver` stops the thread and is kept in `error` for the engine to raise.
    """

    def __init__(self, deliver: Callable[[PendingFrames, float], None]) -> None:
        self._deliver = deliver
        self._condition = threading.Condition()
        self._queue: deque[PendingFrames] = deque()
        self._closing = False
        self._thread: threading.Thread | None = None
        self._last_done: float | None = None
        self._steps: deque[float] = deque(maxlen=WINDOW)
        self._launches: deque[float] = deque(maxlen=WINDOW)
        self.delivered = 0
        self.error: Exception | None = None

    def start(self) -> None:
        """Start the delivery thread (again, after `finish`)."""
        with self._condition:
            self._closing = False
            self.error = None
        self._thread = threading.Thread(target=self._run, name="delivery", daemon=True)
        self._thread.start()

    def put(self, pending: PendingFrames, launch_seconds: float) -> None:
        """Hand over a launched step; `launch_seconds` is what launching it took on the host."""
        with self._condition:
            self._queue.append(pending)
            self._launches.append(launch_seconds)
            self._condition.notify_all()

    @property
    def in_flight(self) -> int:
        """Steps launched and not yet delivered."""
        with self._condition:
            return len(self._queue)

    def wait_for_launch(self, timeout: float) -> bool:
        """Wait until the next step should be launched; False when `timeout` seconds pass first."""
        deadline = now() + timeout
        with self._condition:
            while True:
                launch_at = self._launch_at()
                current = now()
                if launch_at <= current:
                    return True
                if current >= deadline or self.error is not None:
                    return False
                self._condition.wait(min(launch_at, deadline) - current)

    def finish(self, stall_seconds: float) -> None:
        """Deliver every step already launched, then end the thread.

        Waits as long as deliveries go on; after `stall_seconds` without one (a GPU that stopped
        answering) it gives up and says how many steps are lost.
        """
        with self._condition:
            self._closing = True
            self._condition.notify_all()
        thread = self._thread
        if thread is None:
            return
        if not join_while_progressing(thread, lambda: self.delivered, stall_seconds):
            log.warning(
                "the GPU finished no step for %.0f s while stopping; %d launched steps are lost.",
                stall_seconds,
                self.in_flight,
            )

    def _launch_at(self) -> float:
        """When the next step should launch: -inf for now, inf until a step is delivered."""
        if not self._queue:
            return -math.inf
        if len(self._queue) >= MAX_IN_FLIGHT:
            return math.inf
        running = self._queue[0]
        if running.finished():
            return -math.inf
        if not self._steps:  # nothing learnt yet: one step at a time
            return math.inf
        began = running.started
        if self._last_done is not None:
            began = max(began, self._last_done)
        step = statistics.median(self._steps)
        # Capped at half a step: a launch that itself waits for the GPU (a similarity filter
        # that reads a value back) would otherwise teach ever earlier launches.
        lead = min(statistics.median(self._launches) + LAUNCH_MARGIN, step / 2)
        return began + step - lead

    def _run(self) -> None:
        while True:
            with self._condition:
                while not self._queue and not self._closing:
                    self._condition.wait(IDLE_WAIT)
                if not self._queue:
                    return
                pending = self._queue[0]
                previous = self._last_done
            try:
                pending.wait()
                done = now()
                began = pending.started if previous is None else max(pending.started, previous)
                self._deliver(pending, done - began)
            except Exception as error:  # the engine raises it on its own thread
                with self._condition:
                    self.error = error
                    self._condition.notify_all()
                return
            with self._condition:
                self._queue.popleft()
                self._last_done = done
                self._steps.append(done - began)
                self.delivered += 1
                self._condition.notify_all()
