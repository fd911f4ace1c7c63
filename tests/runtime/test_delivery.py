"""Frames go to the sinks when their step is done, not when the next one is launched.

A `ManualGpu` stands in for the GPU: each step's download finishes only when the test says so,
as a CUDA event would when the GPU gets there. The rest is the real engine on synthetic:tiny.
"""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from bridge.control import ParamStore
from bridge.io import Frame, Source, now
from bridge.runtime import delivery as delivery_module
from bridge.runtime.delivery import LAUNCH_MARGIN, Delivery
from bridge.runtime.engine import Engine, EngineHooks
from bridge.runtime.transfer import MAX_IN_FLIGHT, HostTransfer, PendingFrames
from bridge.runtime.workers import CountingSlot
from bridge.stream import StreamConfig, StreamDiffusion
from tests.runtime.helpers import LocalSource, RecordingSink
from tests.runtime.test_engine import StillSource, picture, wait_for

SIZE = 64


class GpuStep:
    """The event of one step's download: done when the test releases it."""

    def __init__(self) -> None:
        self.released = threading.Event()

    def query(self) -> bool:
        return self.released.is_set()

    def synchronize(self) -> None:
        assert self.released.wait(30), "the test never finished this step"


class ManualGpu(HostTransfer):
    """Host transfers whose downloads finish one by one, when the test releases them."""

    def __init__(self) -> None:
        super().__init__(torch.device("cpu"))
        self.steps: list[GpuStep] = []

    def download(self, pixels, capture_times, pixel_format, started) -> PendingFrames:
        pending = super().download(pixels, capture_times, pixel_format, started)
        pending.done = GpuStep()
        self.steps.append(pending.done)
        return pending


class Recorder(RecordingSink):
    """A recording sink: it gets every frame the engine makes, and says when one arrives."""

    keeps_every_frame = True

    def __init__(self) -> None:
        super().__init__()
        self.arrived = threading.Event()

    def _write(self, frame: Frame) -> None:
        super()._write(frame)
        self.arrived.set()


class OneFrameSource(LocalSource):
    """Gives one frame, then none: an input that stops after its first frame."""

    label = "one frame"

    def __init__(self) -> None:
        super().__init__()
        self.given = 0

    def _read(self, timeout: float) -> Frame | None:
        if self.given:
            threading.Event().wait(timeout)
            return None
        self.given += 1
        return Frame(picture(), "rgb", now(), 0)


class WatchedSlot(CountingSlot):
    """An input slot that notes whether the sink had the first frame while the engine was
    waiting for the second: when the engine next looks and finds no frame, it waits here until
    the sink has it (or 10 s)."""

    def __init__(self, arrived: threading.Event) -> None:
        super().__init__(lambda: None)
        self.arrived = arrived
        self.taken = 0
        self.shown_while_waiting: list[bool] = []

    def take(self, timeout: float) -> Frame | None:
        frame = super().take(timeout)
        if frame is not None:
            self.taken += 1
        elif self.taken == 1 and not self.shown_while_waiting:
            self.shown_while_waiting.append(self.arrived.wait(10))
        return frame


def engine_with(tiny, source: Source, sink, reports: list) -> Engine:
    stream = StreamDiffusion(tiny, StreamConfig(width=SIZE, height=SIZE), prompt="a reef")
    hooks = EngineHooks(status=reports.append)
    return Engine(stream, ParamStore(), source, [sink], hooks=hooks, status_interval=0.05)


def run_engine(engine: Engine) -> tuple[threading.Event, threading.Thread, list[int]]:
    stop, produced = threading.Event(), []
    thread = threading.Thread(target=lambda: produced.append(engine.run(stop)), daemon=True)
    thread.start()
    return stop, thread, produced


def test_a_frame_reaches_the_sink_before_the_next_input_frame_comes(tiny):
    sink, reports = Recorder(), []
    source = OneFrameSource()
    engine = engine_with(tiny, source, sink, reports)
    engine.input_slot = slot = WatchedSlot(sink.arrived)
    stop, thread, _ = run_engine(engine)
    try:
        wait_for(lambda: slot.shown_while_waiting, timeout=30)
    finally:
        stop.set()
        thread.join(10)
    assert source.given == 1
    assert slot.shown_while_waiting == [True]  # no next frame, no next launch: delivered
    assert [frame.index for frame in sink.frames] == [0]


def test_steps_go_out_when_done_in_launch_order_and_a_stop_delivers_every_launched_one(tiny):
    sink, reports = Recorder(), []
    engine = engine_with(tiny, StillSource(picture()), sink, reports)
    engine.transfer = gpu = ManualGpu()
    stop, thread, produced = run_engine(engine)

    def loop_went_round() -> None:  # a few status reports: the engine looked again meanwhile
        seen = len(reports)
        wait_for(lambda: len(reports) >= seen + 3)

    try:
        wait_for(lambda: len(gpu.steps) == 1)
        loop_went_round()
        assert sink.frames == [] and len(gpu.steps) == 1  # not done: nothing out, no 2nd step
        gpu.steps[0].released.set()
        wait_for(lambda: len(sink.frames) == 1)  # out as soon as done, the next step not done
        wait_for(lambda: len(gpu.steps) == 3)  # the next step runs, a third is queued behind
        loop_went_round()
        assert len(gpu.steps) == MAX_IN_FLIGHT + 1 and engine._delivery.in_flight == 2
        gpu.steps[2].released.set()  # the later step finishes first ...
        loop_went_round()
        assert len(sink.frames) == 1  # ... and waits for the one before it
        gpu.steps[1].released.set()
        wait_for(lambda: len(sink.frames) == 3)
        wait_for(lambda: engine._delivery.in_flight == 2)  # two more launched, both not done
    finally:
        stop.set()
        finish_every_step(gpu, thread)  # the GPU finishes what it was given after the stop
    assert not thread.is_alive()
    assert produced == [len(gpu.steps)] and produced[0] >= 5
    assert [frame.index for frame in sink.frames] == list(range(produced[0]))
    captures = [frame.capture_time for frame in sink.frames]
    assert captures == sorted(captures)
    assert engine.metrics.frames == produced[0]


def finish_every_step(gpu: ManualGpu, thread: threading.Thread) -> None:
    """Release every step, also one launched while stopping, until the engine has returned."""
    for _ in range(600):
        for step in list(gpu.steps):
            step.released.set()
        thread.join(0.05)
        if not thread.is_alive():
            return


def fake_step(started: float, step: GpuStep | None = None) -> PendingFrames:
    pixels = np.zeros((1, 2, 2, 3), np.uint8)
    return PendingFrames(pixels, [started], "rgb", started, step)


@pytest.fixture
def clock(monkeypatch) -> list[float]:
    """The delivery module's clock, set by the test: [seconds]."""
    time = [100.0]
    monkeypatch.setattr(delivery_module, "now", lambda: time[0])
    return time


def test_while_a_step_runs_the_next_launches_a_launch_before_the_step_should_end(clock):
    delivered: list[PendingFrames] = []
    delivery = Delivery(lambda pending, step_seconds: delivered.append(pending))
    delivery.start()
    try:
        assert delivery.wait_for_launch(0)  # nothing on the GPU: launch at once
        first, running, queued = GpuStep(), GpuStep(), GpuStep()
        steps = [first, running, queued]
        delivery.put(fake_step(100.0, first), launch_seconds=0.0005)
        assert not delivery.wait_for_launch(0)  # nothing learnt yet: one step at a time
        clock[0] = 100.006
        first.released.set()
        wait_for(lambda: delivery.delivered == 1)  # it took 6 ms

        delivery.put(fake_step(100.0065, running), launch_seconds=0.0005)
        launch_at = 100.0065 + 0.006 - (0.0005 + LAUNCH_MARGIN)  # its end less a launch
        clock[0] = launch_at - 0.0001
        assert not delivery.wait_for_launch(0)
        clock[0] = launch_at + 1e-9
        assert delivery.wait_for_launch(0)

        delivery.put(fake_step(clock[0], queued), launch_seconds=0.0005)
        clock[0] += 1.0
        assert not delivery.wait_for_launch(0)  # two undelivered: wait, however late
        queued.released.set()
        assert not delivery.wait_for_launch(0)  # the later one is done, the earlier not
        assert len(delivered) == 1
        running.released.set()
        wait_for(lambda: delivery.delivered == 3)
        assert delivery.wait_for_launch(0)
    finally:
        for step in steps:
            step.released.set()
        delivery.finish(5)
    assert [pending.done for pending in delivered] == steps  # in launch order


def test_a_finished_step_lets_the_next_launch_before_it_is_delivered(clock):
    gate = threading.Event()

    def slow_deliver(pending: PendingFrames, step_seconds: float) -> None:
        assert gate.wait(30)

    delivery = Delivery(slow_deliver)
    delivery.start()
    try:
        delivery.put(fake_step(100.0, None), launch_seconds=0.0)  # off CUDA: done at launch
        assert delivery.wait_for_launch(0)
        delivery.put(fake_step(100.0, None), launch_seconds=0.0)
        assert not delivery.wait_for_launch(0)  # still two undelivered
    finally:
        gate.set()
        delivery.finish(5)
    assert delivery.delivered == 2 and delivery.in_flight == 0
