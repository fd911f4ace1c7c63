"""The similarity filter on CUDA: the decisions the CPU makes, taken without waiting for the GPU
work queued before the frame.

The frame step of the previous frame is stood in for by `torch.cuda._sleep` on the main stream,
followed by an event: a decision returned while that event has not passed did not wait for it.
Frames are 256 pixels a side, so pooling is part of every comparison.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bridge.runtime.transfer import HostTransfer
from bridge.stream import SimilarityFilter, StreamConfig, StreamDiffusion, similarity
from bridge.stream.frames import upload_event
from tests.accel.helpers import load_tiny

pytestmark = pytest.mark.gpu

SIDE = 256
# About a second and a half of GPU time on an H200's clock: far more than an upload and a
# pooled comparison take, so only a decision that waited for it can see it finished.
SLEEP_CYCLES = 3_000_000_000
THRESHOLD = 0.985


def pictures(count: int, seed: int = 0) -> list[np.ndarray]:
    """One coarse picture blended towards another by a random amount, with grain: cosine
    similarities between 0.97 and 0.995, on both sides of THRESHOLD."""
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, (SIDE // 32, SIDE // 32, 3)).repeat(32, 0).repeat(32, 1)
    other = rng.integers(0, 256, base.shape)
    frames = []
    for _ in range(count):
        blend = rng.uniform(0, 0.5)
        grain = rng.normal(0, 20, base.shape)
        picture = (1 - blend) * base + blend * other + grain
        frames.append(np.clip(picture, 0, 255).astype(np.uint8))
    return frames


def uploaded(transfer: HostTransfer, picture: np.ndarray) -> tuple[torch.Tensor, object]:
    """(1, H, W, C) pixels on the GPU through the engine's upload, and their upload event."""
    pixels = transfer.upload(picture)
    return pixels.unsqueeze(0), upload_event(pixels)


def busy_main_stream() -> torch.cuda.Event:
    """Queue a long sleep on the main stream; the event passes when it ends."""
    torch.cuda.synchronize()
    torch.cuda._sleep(SLEEP_CYCLES)
    slept = torch.cuda.Event()
    slept.record()
    return slept


def test_uploaded_frames_get_the_decisions_and_similarities_of_the_cpu():
    transfer = HostTransfer(torch.device("cuda"))
    on_cpu = SimilarityFilter(THRESHOLD, max_skip_frames=3, seed=5)
    on_gpu = SimilarityFilter(THRESHOLD, max_skip_frames=3, seed=5)
    waiting = SimilarityFilter(THRESHOLD, max_skip_frames=3, seed=5)
    expected, decided, synchronous = [], [], []
    for picture in pictures(40):
        expected.append(on_cpu.should_skip_pixels(torch.from_numpy(picture)[None], "rgb"))
        pixels, ready = uploaded(transfer, picture)
        assert ready is not None
        decided.append(on_gpu.should_skip_pixels(pixels, "rgb", ready))
        assert on_gpu.last_similarity == pytest.approx(on_cpu.last_similarity, abs=1e-5)
        # Without the upload's event the filter waits for the main stream: same answer.
        synchronous.append(waiting.should_skip_pixels(pixels, "rgb"))
    assert decided == expected == synchronous
    assert True in expected and False in expected[1:]
    # One captured comparison served all 40 frames.
    assert on_gpu.captures == 1


def test_a_frame_of_a_new_size_is_compared_through_a_new_capture_with_the_same_decisions():
    transfer = HostTransfer(torch.device("cuda"))
    on_cpu = SimilarityFilter(THRESHOLD, max_skip_frames=3, seed=2)
    on_gpu = SimilarityFilter(THRESHOLD, max_skip_frames=3, seed=2)
    # 256 and 128 pixels a side both pool to 64: the reference carries over the size change.
    frames = pictures(12, seed=3)
    frames += [picture[::2, ::2].copy() for picture in pictures(12, seed=3)]
    expected, decided, similarities = [], [], []
    for picture in frames:
        expected.append(on_cpu.should_skip_pixels(torch.from_numpy(picture)[None], "rgb"))
        pixels, ready = uploaded(transfer, picture)
        decided.append(on_gpu.should_skip_pixels(pixels, "rgb", ready))
        similarities.append((on_gpu.last_similarity, on_cpu.last_similarity))
    assert decided == expected
    assert all(gpu == pytest.approx(cpu, abs=1e-5) for gpu, cpu in similarities)
    assert on_gpu.captures == 2


def test_a_comparison_that_cannot_be_captured_runs_uncaptured_with_the_same_decisions(
    monkeypatch,
):
    def refuse(*args):
        raise RuntimeError("stand-in for a failed capture")

    monkeypatch.setattr(similarity, "_Comparison", refuse)
    transfer = HostTransfer(torch.device("cuda"))
    on_cpu = SimilarityFilter(THRESHOLD, max_skip_frames=3, seed=4)
    on_gpu = SimilarityFilter(THRESHOLD, max_skip_frames=3, seed=4)
    expected, decided = [], []
    for picture in pictures(20, seed=4):
        expected.append(on_cpu.should_skip_pixels(torch.from_numpy(picture)[None], "rgb"))
        pixels, ready = uploaded(transfer, picture)
        decided.append(on_gpu.should_skip_pixels(pixels, "rgb", ready))
    assert decided == expected and True in decided
    assert on_gpu.captures == 0


def test_the_decision_does_not_wait_for_work_queued_before_the_upload():
    transfer = HostTransfer(torch.device("cuda"))
    still = pictures(1)[0]
    filt = SimilarityFilter(0.5, max_skip_frames=10, seed=0)
    for _ in range(2):  # the rings, the side stream, the pinned scalar and a reference exist
        pixels, ready = uploaded(transfer, still)
        filt.should_skip_pixels(pixels, "rgb", ready)
    slept = busy_main_stream()
    pixels, ready = uploaded(transfer, still)
    skip = filt.should_skip_pixels(pixels, "rgb", ready)
    assert not slept.query()  # decided while the stand-in frame step still runs
    assert skip and filt.last_similarity == pytest.approx(1.0, abs=1e-6)
    torch.cuda.synchronize()


def test_a_pipeline_skips_an_uploaded_frame_while_the_step_before_it_runs(tmp_path):
    components = load_tiny("cuda", tmp_path)
    config = StreamConfig(width=SIDE, height=SIDE, similarity_filter=True, similarity_threshold=0.5)
    stream = StreamDiffusion(components, config, prompt="a forest")
    transfer = HostTransfer(torch.device("cuda"))
    still = pictures(1)[0]
    first = stream.img2img(transfer.upload(still)).clone()
    stream.img2img(transfer.upload(still))
    skipped = stream.frames_skipped
    assert skipped == 1
    slept = busy_main_stream()
    out = stream.img2img(transfer.upload(still))
    assert not slept.query()  # the frame was judged without waiting for the main stream
    assert stream.frames_skipped == skipped + 1
    torch.cuda.synchronize()
    assert torch.equal(out, first)
