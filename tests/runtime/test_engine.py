"""The engine joins a source, the pipeline, the parameter store and sinks."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import torch

from bridge.control import OscClient, OscServer, ParamStore
from bridge.io import Frame, Sink, now
from bridge.runtime.engine import Engine, EngineHooks
from bridge.runtime.prompts import Fade, slerp
from bridge.stream import StreamConfig, StreamDiffusion
from tests.runtime.helpers import LocalSource, RecordingSink

SIZE = 64


class StillSource(LocalSource):
    """Delivers the same picture as fast as asked, with a fresh capture time each time."""

    label = "still"

    def __init__(self, pixels: np.ndarray) -> None:
        super().__init__()
        self.pixels = pixels
        self.count = 0

    def _read(self, timeout: float) -> Frame | None:
        time.sleep(0.002)
        self.count += 1
        return Frame(self.pixels, "rgb", now(), self.count)


def picture(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)


def make_engine(tiny, store: ParamStore, sink: Sink, **settings) -> Engine:
    config = StreamConfig(width=SIZE, height=SIZE, **settings)
    stream = StreamDiffusion(tiny, config, prompt=store.get("prompt"))
    return Engine(stream, store, StillSource(picture()), [sink], status_interval=0.2)


def run_in_thread(engine: Engine, frames: int | None = None):
    stop = threading.Event()
    thread = threading.Thread(target=engine.run, args=(stop, frames), daemon=True)
    thread.start()
    return stop, thread


def wait_for(condition, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.01)


def test_frames_flow_from_source_to_sink_with_their_capture_time(tiny):
    sink = RecordingSink()
    engine = make_engine(tiny, ParamStore({"prompt": "a glacier"}), sink)
    produced = engine.run(threading.Event(), max_frames=5)
    assert produced == 5
    assert len(sink.frames) >= 1
    last = sink.frames[-1]
    assert last.pixels.shape == (SIZE, SIZE, 3)
    assert 0 < now() - last.capture_time < 30
    assert engine.metrics.status().latency_ms > 0


def test_an_osc_prompt_change_changes_the_next_frames(tiny):
    store = ParamStore({"prompt": "a glacier", "cfg_type": "none", "t_index_list": (45,)})
    sink = RecordingSink()
    engine = make_engine(tiny, store, sink, cfg_type="none", t_index_list=(45,))
    with OscServer(store, port=0) as server, OscClient(*server.address) as client:
        stop, thread = run_in_thread(engine)
        try:
            wait_for(lambda: len(sink.frames) >= 3)
            before = sink.frames[-1].pixels.copy()
            assert np.array_equal(sink.frames[-2].pixels, before)  # a still input is stable
            client.send("/sd/prompt", "a volcano at night")
            assert client.get("prompt") == ["a volcano at night"]
            wait_for(lambda: not np.array_equal(sink.frames[-1].pixels, before))
        finally:
            stop.set()
            thread.join(5)


def test_a_burst_of_changes_is_applied_between_two_frames(tiny):
    store = ParamStore()
    sink = RecordingSink()
    engine = make_engine(tiny, store, sink)
    engine.apply(store.snapshot())
    store.set_many({"guidance_scale": 2.0, "delta": 0.5, "t_index_list": (10, 20, 30)})
    engine.apply(store.snapshot())
    config = engine.stream.config
    assert (config.guidance_scale, config.delta, config.t_index_list) == (2.0, 0.5, (10, 20, 30))


def test_pause_stops_producing_frames_until_resumed(tiny):
    store = ParamStore()
    sink = RecordingSink()
    engine = make_engine(tiny, store, sink)
    reports: list = []
    engine.hooks = EngineHooks(status=reports.append)
    stop, thread = run_in_thread(engine)
    try:
        wait_for(lambda: len(sink.frames) >= 2)
        store.set("pause", True)
        wait_for(lambda: engine.paused and engine._delivery.in_flight == 0)  # nothing in flight
        paused_at = engine.metrics.frames
        seen = len(reports)
        wait_for(lambda: len(reports) >= seen + 3)  # the loop went round, paused, a while
        assert engine.metrics.frames == paused_at
        store.set("pause", False)
        wait_for(lambda: engine.metrics.frames > paused_at)
    finally:
        stop.set()
        thread.join(5)


def test_prompt_fade_blends_embeddings_over_time(tiny):
    store = ParamStore({"prompt": "a glacier"})
    engine = make_engine(tiny, store, RecordingSink())
    start = engine.stream.current_embedding()
    target = engine.stream.encode_prompt("a volcano")
    fade = Fade(start, target, seconds=2.0, began=100.0, spherical=False)
    torch.testing.assert_close(fade.value(100.0), start)
    torch.testing.assert_close(fade.value(101.0), (start + target) / 2)
    torch.testing.assert_close(fade.value(105.0), target)


def test_seed_fade_keeps_noise_at_unit_scale():
    a = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    b = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    middle = slerp(a, b, 0.5)
    assert middle.std().item() == pytest.approx(1.0, abs=0.15)
    assert torch.lerp(a, b, 0.5).std().item() < 0.85
    torch.testing.assert_close(slerp(a, b, 0.0), a)
    torch.testing.assert_close(slerp(a, b, 1.0), b, rtol=1e-4, atol=1e-4)


def test_a_running_seed_fade_ends_on_the_new_seed(tiny):
    store = ParamStore({"seed_fade": 0.3})
    engine = make_engine(tiny, store, RecordingSink())
    engine.apply(store.snapshot())
    store.set("seed", 77)
    engine.apply(store.snapshot())
    assert engine.stream.config.seed != 77  # fading, not cut
    time.sleep(0.35)
    engine._advance_fades()
    assert engine.stream.config.seed == 77
    torch.testing.assert_close(engine.stream.current_noise(), engine.stream.noise_for_seed(77))


LIVE_CHANGES = [
    ("/sd/guidance", 2.5, "guidance_scale", 2.5),
    ("/sd/delta", 0.3, "delta", 0.3),
    ("/sd/cfg", "full", "cfg_type", "full"),
    ("/sd/t_index", [20, 40], "t_index_list", (20, 40)),
    ("/sd/seed", 1234, "seed", 1234),
    ("/sd/do_add_noise", 0, "do_add_noise", False),
]


@pytest.mark.parametrize(("address", "value", "field", "expected"), LIVE_CHANGES)
def test_each_osc_knob_reaches_the_pipeline_and_changes_the_frames(
    tiny, address, value, field, expected
):
    store = ParamStore({"prompt": "a glacier"})
    sink = RecordingSink()
    engine = make_engine(tiny, store, sink)
    with OscServer(store, port=0) as server, OscClient(*server.address) as client:
        stop, thread = run_in_thread(engine)
        try:
            wait_for(lambda: len(sink.frames) >= 4)
            before = sink.frames[-1].pixels.copy()
            client.send(address, *(value if isinstance(value, list) else [value]))
            sent = value if isinstance(value, list) else [value]
            assert client.get(address) == pytest.approx(sent)  # OSC floats are 32-bit
            wait_for(lambda: getattr(engine.stream.config, field) == pytest.approx(expected))
            wait_for(lambda: not np.array_equal(sink.frames[-1].pixels, before))
        finally:
            stop.set()
            thread.join(5)
