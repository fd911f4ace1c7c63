"""The engine under faults: an input that goes away, a step that breaks, slow sinks."""

from __future__ import annotations

import logging
import threading
import time

import numpy as np
import pytest

from bridge.control import ParamStore
from bridge.io import Frame, Sink, Source, now
from bridge.runtime.engine import Engine, EngineHooks
from bridge.stream import StreamConfig, StreamDiffusion
from tests.runtime.helpers import LocalSource, RecordingSink
from tests.runtime.test_engine import picture, wait_for

SIZE = 64


class SwitchableSource(LocalSource):
    """A still picture that can be switched off and on, like a sender closing and reopening."""

    label = "switchable"

    def __init__(self, period: float = 0.005) -> None:
        super().__init__()
        self.on = threading.Event()
        self.on.set()
        self.count = 0
        self.period = period

    @property
    def connected(self) -> bool:
        return self.on.is_set()

    def _read(self, timeout: float) -> Frame | None:
        if not self.on.wait(timeout):
            return None
        time.sleep(self.period)
        self.count += 1
        return Frame(picture(self.count % 3), "rgb", now(), self.count)


class SlowSink(RecordingSink):
    """Takes `delay` seconds per frame."""

    def __init__(self, delay: float) -> None:
        super().__init__()
        self.delay = delay

    def _write(self, frame: Frame) -> None:
        time.sleep(self.delay)
        super()._write(frame)


class Recorder(RecordingSink):
    """A recording sink: it asks for every frame the engine makes."""

    keeps_every_frame = True


class GatedSink(RecordingSink):
    """Each write waits until the test opens the gate once."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = threading.Semaphore(0)
        self.writing = threading.Event()

    def _write(self, frame: Frame) -> None:
        self.writing.set()
        assert self.gate.acquire(timeout=30), "the test never opened the gate"
        super()._write(frame)


class Hooks:
    def __init__(self) -> None:
        self.errors: list[tuple[str, str]] = []
        self.states: list[str] = []

    def engine_hooks(self) -> EngineHooks:
        return EngineHooks(
            error=lambda a, s: self.errors.append((a, s)), input_state=self.states.append
        )


def engine_with(tiny, source: Source, sinks: list[Sink], store=None, **options):
    store = store or ParamStore()
    stream = StreamDiffusion(tiny, StreamConfig(width=SIZE, height=SIZE), prompt="a reef")
    return Engine(stream, store, source, sinks, status_interval=0.2, **options)


def running(engine: Engine):
    stop = threading.Event()
    thread = threading.Thread(target=engine.run, args=(stop,), daemon=True)
    thread.start()
    return stop, thread


def test_a_lost_input_keeps_outputs_alive_with_the_last_frame_and_is_reported_once(tiny, caplog):
    source, sink, hooks = SwitchableSource(), RecordingSink(), Hooks()
    engine = engine_with(
        tiny, source, [sink], hooks=hooks.engine_hooks(), input_loss_after=0.2, hold_fps=50
    )
    stop, thread = running(engine)
    try:
        wait_for(lambda: len(sink.frames) >= 3)
        source.on.clear()
        wait_for(lambda: hooks.states == ["lost"])
        last = engine._last_frame.pixels.copy()
        held_before = len(sink.frames)
        wait_for(lambda: len(sink.frames) >= held_before + 10)  # held frames keep flowing
        assert np.array_equal(sink.frames[-1].pixels, last)
        source.on.set()
        wait_for(lambda: hooks.states == ["lost", "ok"])
    finally:
        stop.set()
        thread.join(5)
    losses = [sentence for address, sentence in hooks.errors if address == "/sd/input"]
    assert len(losses) == 1 and "switchable is gone; sending the last frame" in losses[0]
    # The error hook shows the sentence; the engine does not print it a second time.
    assert not [r for r in caplog.records if "is gone" in r.getMessage()]


def test_held_frames_keep_their_capture_time_count_once_for_latency_and_skip_recordings(tiny):
    source, live, recorder, hooks = SwitchableSource(), RecordingSink(), Recorder(), Hooks()
    engine = engine_with(
        tiny,
        source,
        [live, recorder],
        hooks=hooks.engine_hooks(),
        input_loss_after=0.2,
        hold_fps=50,
    )
    stop, thread = running(engine)
    try:
        wait_for(lambda: len(live.frames) >= 3)
        source.on.clear()
        wait_for(lambda: hooks.states == ["lost"])
        held_from = len(live.frames)
        wait_for(lambda: len(live.frames) >= held_from + 5)
        source.on.set()
        wait_for(lambda: hooks.states == ["lost", "ok"])
        made = engine.metrics.frames
        wait_for(lambda: engine.metrics.frames >= made + 3)
    finally:
        stop.set()
        thread.join(30)
    captures = [frame.capture_time for frame in live.frames]
    assert captures == sorted(captures)  # never backwards, across the loss and the return
    repeats = [a for a, b in zip(captures, captures[1:], strict=False) if a == b]
    assert len(repeats) >= 5  # the held frames, each with the last frame's capture time
    # A recording holds exactly the frames the engine made, each once.
    recorded = [frame.capture_time for frame in recorder.frames]
    assert len(recorded) == engine.metrics.frames == len(set(recorded))
    # Latency is measured once per capture per sink: held frames are not samples.
    assert engine.metrics.latency_samples == len(set(captures)) + len(recorded)


def test_input_waiting_lost_and_back_are_one_line_each(tiny, caplog):
    caplog.set_level(logging.WARNING, logger="sd_bridge")
    source, sink = SwitchableSource(), RecordingSink()
    source.on.clear()  # no writer yet when the bridge starts
    engine = engine_with(tiny, source, [sink], input_loss_after=0.2)

    def lines() -> list[str]:
        return [r.getMessage() for r in caplog.records if r.name == "sd_bridge"]

    stop, thread = running(engine)
    try:
        wait_for(lambda: len(lines()) == 1)
        source.on.set()
        wait_for(lambda: len(lines()) == 2 and engine.metrics.frames > 0)
        source.on.clear()
        wait_for(lambda: len(lines()) == 3)
        source.on.set()
        wait_for(lambda: len(lines()) == 4)
        made = engine.metrics.frames
        wait_for(lambda: engine.metrics.frames > made + 2)
    finally:
        stop.set()
        thread.join(30)
    waiting, arrived, lost, back = lines()
    assert waiting == "waiting for input switchable; no frame yet."
    assert arrived == "input switchable delivers frames."
    assert lost == "input switchable is gone; sending the last frame until it returns."
    assert back == "input switchable is back."


def test_black_is_sent_while_the_input_is_gone_when_asked(tiny):
    source, sink, hooks = SwitchableSource(), RecordingSink(), Hooks()
    engine = engine_with(
        tiny,
        source,
        [sink],
        hooks=hooks.engine_hooks(),
        input_loss_after=0.2,
        on_input_loss="black",
    )
    stop, thread = running(engine)
    try:
        wait_for(lambda: len(sink.frames) >= 2)
        source.on.clear()
        wait_for(lambda: hooks.states == ["lost"])
        wait_for(lambda: not sink.frames[-1].pixels.any())
    finally:
        stop.set()
        thread.join(5)


@pytest.mark.slow
def test_an_input_flapping_twenty_times_never_stops_the_engine(tiny):
    # Every flap takes the same path (lost, held, back); a leak or a miscount per flap shows
    # after the first few, so twenty catch it as well as more would.
    flaps = 20
    source, sink, hooks = SwitchableSource(), RecordingSink(), Hooks()
    engine = engine_with(tiny, source, [sink], hooks=hooks.engine_hooks(), input_loss_after=0.03)
    stop, thread = running(engine)
    try:
        wait_for(lambda: engine.metrics.frames > 2)
        threads_before = threading.active_count()
        for _ in range(flaps):
            produced = engine.metrics.frames
            wait_for(lambda p=produced: engine.metrics.frames > p, timeout=5)
            source.on.clear()
            wait_for(lambda: source.count and hooks.states[-1:] == ["lost"], timeout=5)
            source.on.set()
        assert thread.is_alive()
        assert threading.active_count() <= threads_before
    finally:
        stop.set()
        thread.join(5)
    assert hooks.states.count("lost") == flaps
    assert hooks.states.count("ok") >= flaps - 1


@pytest.mark.parametrize(
    "failure",
    [RuntimeError("CUDA out of memory (simulated)"), IndexError("index 10 is out of bounds")],
    ids=["out-of-memory", "a-bug"],
)
def test_a_change_that_breaks_the_step_falls_back_to_the_last_working_settings(tiny, failure):
    source, sink, hooks = SwitchableSource(), RecordingSink(), Hooks()
    store = ParamStore()
    engine = engine_with(tiny, source, [sink], store=store, hooks=hooks.engine_hooks())
    working_step = engine.stream.frame_step

    def frame_step(pixels, pixel_format):
        if engine.stream.config.cfg_type == "full":
            raise failure
        return working_step(pixels, pixel_format)

    engine.stream.frame_step = frame_step
    stop, thread = running(engine)
    try:
        wait_for(lambda: len(sink.frames) >= 2)
        store.set("cfg_type", "full")
        wait_for(lambda: any("back to the last settings" in s for _, s in hooks.errors))
        wait_for(lambda: store.get("cfg_type") == "self")
        produced = engine.metrics.frames
        wait_for(lambda: engine.metrics.frames > produced + 2)
    finally:
        stop.set()
        thread.join(5)
    assert engine.stream.config.cfg_type == "self"


def test_a_slow_sink_loses_frames_but_the_fast_one_gets_every_frame(tiny):
    fast, slow = Recorder(), SlowSink(delay=0.15)
    engine = engine_with(tiny, SwitchableSource(period=0.04), [fast, slow])
    stop, thread = running(engine)
    try:
        wait_for(lambda: len(slow.frames) >= 6, timeout=60)
        made = engine.metrics.frames
        wait_for(lambda: engine.metrics.frames >= 2 * made + 6, timeout=60)
    finally:
        stop.set()
        thread.join(30)
    assert [frame.index for frame in fast.frames] == list(range(engine.metrics.frames))
    indices = [frame.index for frame in slow.frames]
    assert indices == sorted(set(indices))  # newer frames only, never a frame twice
    assert len(slow.frames) < len(fast.frames)
    assert engine.metrics.drops > 0


def test_a_busy_live_sink_writes_the_newest_frame_next_and_counts_the_rest_as_drops():
    from bridge.runtime.metrics import Metrics
    from bridge.runtime.workers import SinkWorker

    sink, metrics, finish = GatedSink(), Metrics(), threading.Event()
    worker = SinkWorker(sink, metrics, finish)
    worker.start()
    try:
        worker.slot.put(Frame(picture(), "rgb", now(), 0))
        assert sink.writing.wait(30)  # frame 0 is being written, and the sink is stuck on it
        for index in range(1, 11):
            worker.slot.put(Frame(picture(), "rgb", now(), index))
        sink.gate.release()
        sink.gate.release()
        wait_for(lambda: len(sink.frames) == 2)
    finally:
        finish.set()
        sink.gate.release()
        worker.join(30)
    # A frame waits behind at most one write: latency is bounded by one write, whatever its
    # length, because frames 1 to 9 were replaced instead of queued.
    assert [frame.index for frame in sink.frames] == [0, 10]
    assert metrics.drops == 9


def test_a_sink_that_keeps_up_gets_every_frame():
    from bridge.runtime.metrics import Metrics
    from bridge.runtime.workers import SinkWorker

    sink, metrics, finish = RecordingSink(), Metrics(), threading.Event()
    worker = SinkWorker(sink, metrics, finish)
    worker.start()
    try:
        for index in range(100):
            worker.slot.put(Frame(picture(), "rgb", now(), index))
            wait_for(lambda i=index: len(sink.frames) == i + 1, timeout=10)
    finally:
        finish.set()
        worker.join(30)
    assert [frame.index for frame in sink.frames] == list(range(100))
    assert metrics.drops == 0


def test_finishing_a_sink_writes_every_frame_it_was_given_then_closes_it():
    from bridge.runtime.metrics import Metrics
    from bridge.runtime.workers import SinkWorker

    recorder = SlowSink(delay=0.005)
    recorder.keeps_every_frame = True
    metrics, finish = Metrics(), threading.Event()
    worker = SinkWorker(recorder, metrics, finish)
    for index in range(30):
        worker.slot.put(Frame(picture(), "rgb", now(), index))
    finish.set()  # asked to finish before it wrote a single frame
    worker.start()
    worker.join(60)
    assert not worker.is_alive()
    assert [frame.index for frame in recorder.frames] == list(range(30))
    assert not recorder.is_open


def test_a_recording_sink_keeps_every_frame_even_when_it_falls_behind():
    from bridge.runtime.metrics import Metrics
    from bridge.runtime.workers import SinkWorker

    recorder = SlowSink(delay=0.01)
    recorder.keeps_every_frame = True
    metrics, finish = Metrics(), threading.Event()
    worker = SinkWorker(recorder, metrics, finish)
    worker.start()
    try:
        for index in range(50):
            worker.slot.put(Frame(picture(), "rgb", now(), index))  # a burst, no pause
        wait_for(lambda: len(recorder.frames) == 50, timeout=30)
    finally:
        finish.set()
        worker.join(30)
    assert [frame.index for frame in recorder.frames] == list(range(50))


class BrokenSink(RecordingSink):
    """A sink whose reader went away: every write fails."""

    def _write(self, frame: Frame) -> None:
        from bridge.io import TransportError

        raise TransportError("the reader went away")


def test_a_sink_that_fails_never_slows_the_others(tiny):
    good, broken = Recorder(), BrokenSink()
    engine = engine_with(tiny, SwitchableSource(period=0.04), [broken, good])
    stop, thread = running(engine)
    try:
        wait_for(lambda: len(good.frames) >= 15, timeout=60)
    finally:
        stop.set()
        thread.join(30)
    assert [frame.index for frame in good.frames] == list(range(engine.metrics.frames))
    assert engine.metrics.sink_errors > 0
