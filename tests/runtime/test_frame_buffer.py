"""`frame_buffer_size` f > 1: a live source fills each batch of f frames across loop iterations."""

from __future__ import annotations

import threading

import pytest

from bridge.control import ParamStore
from bridge.io import Frame, Source
from bridge.io.pattern import PatternSource
from bridge.runtime.engine import Engine, EngineHooks
from bridge.stream import StreamConfig, StreamDiffusion
from tests.runtime.helpers import FedSource, RecordingSink
from tests.runtime.test_engine import wait_for

SIZE = 64


class CountingPattern(PatternSource):
    """A paced pattern that counts the frames it hands out."""

    def __init__(self, fps: float) -> None:
        super().__init__("bars", SIZE, SIZE, fps=fps)
        self.delivered = 0

    def _read(self, timeout: float) -> Frame | None:
        frame = super()._read(timeout)
        if frame is not None:
            self.delivered += 1
        return frame


class Recorder(RecordingSink):
    """A recording sink: it gets every frame the engine makes."""

    keeps_every_frame = True


def engine_for(tiny, source: Source, frame_buffer_size: int, **options) -> Engine:
    config = StreamConfig(width=SIZE, height=SIZE, frame_buffer_size=frame_buffer_size)
    stream = StreamDiffusion(tiny, config, prompt="a reef")
    return Engine(
        stream, ParamStore(), source, [options.pop("sink")], status_interval=0.2, **options
    )


@pytest.mark.parametrize("frame_buffer_size", [2, 4])
def test_a_paced_source_fills_every_batch_and_each_frame_is_used_or_counted(
    tiny, frame_buffer_size
):
    source, sink, states = CountingPattern(fps=30), Recorder(), []
    engine = engine_for(
        tiny,
        source,
        frame_buffer_size,
        sink=sink,
        hooks=EngineHooks(input_state=states.append),
    )
    wanted = 3 * frame_buffer_size
    result: list[int] = []
    thread = threading.Thread(
        target=lambda: result.append(engine.run(threading.Event(), wanted)), daemon=True
    )
    thread.start()
    thread.join(120)
    assert not thread.is_alive(), "the engine never produced its frames"
    wait_for(lambda: not source.is_open, timeout=10)  # the source thread has ended

    assert result == [wanted]
    assert len(sink.frames) == wanted  # a recording sink: every frame the engine made
    captures = [frame.capture_time for frame in sink.frames]
    assert captures == sorted(captures) and len(set(captures)) == wanted
    assert states == []  # the input was never reported missing
    # Every frame the source gave was used, dropped and counted, or is still waiting.
    waiting = len(engine._batch) + engine.input_slot.has_unread()
    assert source.delivered == wanted + engine.metrics.drops + waiting


@pytest.mark.parametrize("frame_buffer_size", [2, 4])
def test_a_partial_batch_waits_for_its_frames_and_is_dropped_when_the_input_goes(
    tiny, frame_buffer_size
):
    source, sink, states = FedSource(SIZE, level=lambda n: n * 40 % 256), Recorder(), []
    engine = engine_for(
        tiny,
        source,
        frame_buffer_size,
        sink=sink,
        hooks=EngineHooks(input_state=states.append),
        input_loss_after=0.3,
    )
    stop = threading.Event()
    thread = threading.Thread(target=engine.run, args=(stop,), daemon=True)
    thread.start()
    try:
        for _ in range(frame_buffer_size + 1):  # one full batch and one frame of the next
            source.feed()
            wait_for(lambda: source.frames.empty() and not engine.input_slot.has_unread())
        wait_for(lambda: engine.metrics.frames == frame_buffer_size)
        wait_for(lambda: states == ["lost"])
        assert engine.metrics.drops == 1  # the lone frame of the unfinished batch
        assert engine._batch == []
        for _ in range(frame_buffer_size):
            source.feed()
            wait_for(lambda: source.frames.empty() and not engine.input_slot.has_unread())
        wait_for(lambda: engine.metrics.frames == 2 * frame_buffer_size)
    finally:
        stop.set()
        thread.join(30)
    assert states == ["lost", "ok"]
    assert [frame.index for frame in sink.frames] == list(range(2 * frame_buffer_size))


@pytest.mark.slow
def test_sd_bridge_run_with_a_frame_buffer_of_two_finishes_with_that_many_frames(
    bridge_process, tmp_path
):
    import av

    out = tmp_path / "out.mp4"
    process = bridge_process(
        "--model",
        "synthetic:tiny",
        "--width",
        "64",
        "--height",
        "64",
        "--input",
        "pattern:",
        "--output",
        f"file:{out}",
        "--frame-buffer-size",
        "2",
        "--frames",
        "20",
        "--no-osc",
    )
    _, stderr = process.communicate(timeout=240)
    assert process.returncode == 0, stderr
    assert "stopped after 20 frames" in stderr
    with av.open(str(out)) as container:
        assert len(list(container.decode(video=0))) == 20
