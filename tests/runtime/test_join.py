"""Stopping waits for a worker thread while it makes progress, and gives up once it stalls."""

from __future__ import annotations

import threading

from bridge.runtime.workers import join_while_progressing


class ScriptedThread:
    """Stands in for a thread: each join advances its work count to the next scripted value;
    it ends when the script runs out, or never if `ends` is False."""

    def __init__(self, counts: list[int], ends: bool = True) -> None:
        self.counts = list(counts)
        self.ends = ends
        self.done = 0
        self.joins: list[float] = []

    def is_alive(self) -> bool:
        return bool(self.counts) or not self.ends

    def join(self, timeout: float) -> None:
        self.joins.append(timeout)
        if self.counts:
            self.done = self.counts.pop(0)


def test_a_thread_that_keeps_working_is_waited_for_until_it_ends():
    thread = ScriptedThread([1, 2, 5, 9])
    assert join_while_progressing(thread, lambda: thread.done, 3.0)
    assert thread.joins == [3.0] * 4


def test_a_thread_that_stops_working_is_given_up_on_after_one_wait_without_progress():
    thread = ScriptedThread([1, 2, 2, 2, 2], ends=False)
    assert not join_while_progressing(thread, lambda: thread.done, 0.5)
    # Waits: 0 -> 1, 1 -> 2, then 2 -> 2 shows the stall.
    assert len(thread.joins) == 3


def test_a_real_thread_that_has_ended_is_not_waited_for_again():
    thread = threading.Thread(target=lambda: None)
    thread.start()
    thread.join()
    assert join_while_progressing(thread, lambda: 0, 10.0)
