"""Delivery on a real GPU: CUDA events, pinned download buffers and the delivery thread together.

Steps are made uneven with `torch.cuda._sleep`, so later steps are queued behind earlier ones
and the delivery thread copies a buffer out while the next download into the ring is launched.
A buffer reused too early shows up as a frame with another step's pixels.
"""

from __future__ import annotations

import threading
import time
from collections import defaultdict

import numpy as np
import pytest
import torch

from bridge.accel import accelerate
from bridge.control import ParamStore
from bridge.io import Frame, now
from bridge.runtime.delivery import Delivery
from bridge.runtime.engine import Engine
from bridge.runtime.transfer import HostTransfer, PendingFrames
from bridge.stream import StreamConfig, StreamDiffusion
from tests.accel.helpers import SIZE, frames, load_tiny
from tests.runtime.helpers import LocalSource, RecordingSink

pytestmark = pytest.mark.gpu

# About a millisecond of GPU time per million cycles on current GPUs; only the order matters.
CYCLES = 1_000_000


def test_steps_leave_the_gpu_in_launch_order_each_with_its_own_pixels():
    device = torch.device("cuda")
    transfer = HostTransfer(device)
    got: list[tuple[float, np.ndarray]] = []

    def deliver(pending: PendingFrames, step_seconds: float) -> None:
        got.append((pending.capture_times[0], pending.result()[0]))

    delivery = Delivery(deliver)
    delivery.start()
    generator = np.random.default_rng(0)
    for step in range(60):
        assert delivery.wait_for_launch(10)
        started = now()
        torch.cuda._sleep(int(CYCLES * generator.uniform(0.2, 3.0)))
        pixels = torch.full((1, SIZE, SIZE, 3), step % 251, dtype=torch.uint8, device=device)
        pending = transfer.download(pixels, [float(step)], "rgb", started)
        delivery.put(pending, now() - started)
    delivery.finish(10)
    assert [capture for capture, _ in got] == [float(step) for step in range(60)]
    assert all(np.all(image == step % 251) for step, (_, image) in enumerate(got))


def test_a_step_is_delivered_while_the_gpu_works_without_a_next_launch_or_a_busy_core():
    device = torch.device("cuda")
    transfer = HostTransfer(device)
    delivered = threading.Event()
    delivery = Delivery(lambda pending, step_seconds: delivered.set())
    delivery.start()
    try:
        torch.cuda.synchronize()
        started, cpu_before = now(), time.process_time()
        torch.cuda._sleep(300 * CYCLES)
        pixels = torch.zeros((1, SIZE, SIZE, 3), dtype=torch.uint8, device=device)
        delivery.put(transfer.download(pixels, [started], "rgb", started), now() - started)
        assert delivered.wait(30)  # nothing else launched: the step goes out on its own
        wall, cpu = now() - started, time.process_time() - cpu_before
    finally:
        delivery.finish(10)
    # The delivery thread sleeps on a blocking event while the GPU works; a spinning wait
    # would spend about as much CPU time as the step lasted.
    assert wall > 0.05 and cpu < 0.5 * wall


class Pictures(LocalSource):
    """Cycles through a few distinct pictures, as fast as asked; remembers which went when."""

    label = "pictures"

    def __init__(self, pictures: list[np.ndarray]) -> None:
        super().__init__()
        self.pictures = pictures
        self.picture_at: dict[float, int] = {}
        self.count = 0

    def _read(self, timeout: float) -> Frame | None:
        time.sleep(0.001)
        which = self.count % len(self.pictures)
        self.count += 1
        captured = now()
        self.picture_at[captured] = which
        return Frame(self.pictures[which], "rgb", captured, self.count)


class Recorder(RecordingSink):
    """A recording sink: every frame the engine makes."""

    keeps_every_frame = True


@pytest.mark.parametrize("accel", ["none", "cudagraph"])
def test_the_engine_on_cuda_delivers_every_frame_in_order_from_its_own_input(tmp_path, accel):
    components = load_tiny("cuda", tmp_path)
    pictures = [np.ascontiguousarray(picture.cpu().numpy()) for picture in frames(3)]
    source, recorder = Pictures(pictures), Recorder()
    # One step, no guidance, fixed noise, the prompt it starts with: each output depends on
    # its own input alone.
    store = ParamStore(
        {"prompt": "a reef", "t_index_list": (45,), "cfg_type": "none", "noise": "fixed"}
    )
    config = StreamConfig(width=SIZE, height=SIZE, t_index_list=(45,), cfg_type="none")
    with torch.inference_mode():
        stream = accelerate(StreamDiffusion(components, config, prompt="a reef"), accel)
        engine = Engine(stream, store, source, [recorder])
        produced = engine.run(threading.Event(), max_frames=60)
    assert produced == 60 == len(recorder.frames) == engine.metrics.frames
    assert [frame.index for frame in recorder.frames] == list(range(60))
    outputs: dict[int, list[np.ndarray]] = defaultdict(list)
    for frame in recorder.frames:
        outputs[source.picture_at[frame.capture_time]].append(frame.pixels.astype(int))
    assert len(outputs) == len(pictures)
    for same_input in outputs.values():  # no frame shows another step's pixels
        assert all(np.abs(image - same_input[0]).max() <= 2 for image in same_input)
    firsts = [images[0] for images in outputs.values()]
    assert np.abs(firsts[0] - firsts[1]).max() > 20  # and the inputs do tell apart
    assert engine.metrics.status().gpu_ms > 0
