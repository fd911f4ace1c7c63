"""The engine under faults: an input that goes away, a step that breaks, slow sinks."""

from __future__ import annotations

import threading
import time

import numpy as np

from bridge.control import ParamStore
from bridge.io import Frame, Sink, Source, now
from bridge.runtime.engine import Engine, EngineHooks
from bridge.stream import StreamConfig, StreamDiffusion
from tests.runtime.test_engine import RecordingSink, picture, wait_for

SIZE = 64


class SwitchableSource(Source):
    """A still picture that can be switched off and on, like a sender closing and reopening."""

    def __init__(self, period: float = 0.005) -> None:
        super().__init__()
        self.on = threading.Event()
        self.on.set()
        self.count = 0
        self.period = period

    @property
    def connected(self) -> bool:
        return self.on.is_set()

    def describe(self) -> str:
        return "switchable"

    def _open(self) -> None:
        pass

    def _close(self) -> None:
        pass

    def _read(self, timeout: float) -> Frame | None:
        if not self.on.wait(timeout):
            return None
        time.sleep(self.period)
        self.count += 1
        return Frame(picture(self.count % 3), "rgb", now(), self.count)


class SlowSink(RecordingSink):
    """Takes `delay` seconds per frame and records when each frame arrived."""

    def __init__(self, delay: float) -> None:
        super().__init__()
        self.delay = delay
        self.latencies: list[float] = []

    def _write(self, frame: Frame) -> None:
        time.sleep(self.delay)
        self.latencies.append(now() - frame.capture_time)
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


def test_a_lost_input_keeps_outputs_alive_with_the_last_frame_and_is_reported_once(tiny):
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
        time.sleep(0.5)
        assert len(sink.frames) >= held_before + 10  # held frames keep flowing at ~50 fps
        assert np.array_equal(sink.frames[-1].pixels, last)
        source.on.set()
        wait_for(lambda: hooks.states == ["lost", "ok"], timeout=1.0)
    finally:
        stop.set()
        thread.join(5)
    losses = [sentence for address, sentence in hooks.errors if address == "/sd/input"]
    assert len(losses) == 1 and "switchable is gone; sending the last frame" in losses[0]


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


def test_an_input_flapping_a_hundred_times_never_stops_the_engine(tiny):
    source, sink, hooks = SwitchableSource(), RecordingSink(), Hooks()
    engine = engine_with(tiny, source, [sink], hooks=hooks.engine_hooks(), input_loss_after=0.03)
    stop, thread = running(engine)
    try:
        wait_for(lambda: engine.metrics.frames > 2)
        threads_before = threading.active_count()
        for _ in range(100):
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
    assert hooks.states.count("lost") == 100
    assert hooks.states.count("ok") >= 99


def test_a_change_that_breaks_the_step_falls_back_to_the_last_working_settings(tiny):
    source, sink, hooks = SwitchableSource(), RecordingSink(), Hooks()
    store = ParamStore()
    engine = engine_with(tiny, source, [sink], store=store, hooks=hooks.engine_hooks())
    working_step = engine.stream.frame_step

    def frame_step(pixels, pixel_format):
        if engine.stream.config.cfg_type == "full":
            raise RuntimeError("CUDA out of memory (simulated)")
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


def test_a_slow_sink_loses_frames_but_its_latency_stays_bounded(tiny):
    fast, slow = RecordingSink(), SlowSink(delay=0.15)
    engine = engine_with(tiny, SwitchableSource(period=0.04), [fast, slow])
    stop, thread = running(engine)
    try:
        wait_for(lambda: len(slow.frames) >= 6, timeout=30)
    finally:
        stop.set()
        thread.join(5)
    assert len(slow.frames) < len(fast.frames) / 2
    assert engine.metrics.drops > 0
    # A frame waits at most one write of the slow sink plus a step: latency stays bounded.
    assert max(slow.latencies[2:]) < 0.5


def test_a_sink_faster_than_the_frame_rate_gets_every_frame():
    from bridge.runtime.metrics import Metrics
    from bridge.runtime.workers import SinkWorker

    sink, metrics, stop = RecordingSink(), Metrics(), threading.Event()
    worker = SinkWorker(sink, metrics, stop)
    worker.start()
    try:
        for index in range(100):
            worker.slot.put(Frame(picture(), "rgb", now(), index))
            time.sleep(0.01)
        wait_for(lambda: len(sink.frames) == 100, timeout=5)
    finally:
        stop.set()
        worker.join(5)
    assert [frame.index for frame in sink.frames] == list(range(100))
    assert metrics.drops == 0


def test_a_recording_sink_keeps_every_frame_even_when_it_falls_behind():
    from bridge.runtime.metrics import Metrics
    from bridge.runtime.workers import SinkWorker

    recorder = SlowSink(delay=0.01)
    recorder.keeps_every_frame = True
    metrics, stop = Metrics(), threading.Event()
    worker = SinkWorker(recorder, metrics, stop)
    worker.start()
    try:
        for index in range(50):
            worker.slot.put(Frame(picture(), "rgb", now(), index))  # a burst, no pause
        wait_for(lambda: len(recorder.frames) == 50, timeout=10)
    finally:
        stop.set()
        worker.join(5)
    assert [frame.index for frame in recorder.frames] == list(range(50))


class BrokenSink(RecordingSink):
    """A sink whose reader went away: every write fails."""

    def _write(self, frame: Frame) -> None:
        from bridge.io import TransportError

        raise TransportError("the reader went away")


def test_a_sink_that_fails_never_slows_the_others(tiny):
    good, broken = RecordingSink(), BrokenSink()
    engine = engine_with(tiny, SwitchableSource(period=0.04), [broken, good])
    stop, thread = running(engine)
    try:
        wait_for(lambda: len(good.frames) >= 15, timeout=30)
    finally:
        stop.set()
        thread.join(5)
    # The good sink keeps the engine's rate (a frame or two may be lost to thread scheduling
    # on a loaded CPU, never the steady loss a blocked sink would cause).
    assert len(good.frames) >= 0.9 * engine.metrics.frames - 1
    assert engine.metrics.sink_errors > 0
