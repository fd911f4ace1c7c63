"""Under a CUDA graph: noise drawn anew on every replay, and guidance crossing 1.0, both live.

Latents are compared, not pixels: they are what noise and guidance act on, and they differ
where rounding to 8-bit pixels could hide a small difference.
"""

from __future__ import annotations

import gc

import pytest
import torch

from bridge.accel import accelerate
from bridge.stream import StreamConfig, StreamDiffusion
from tests.accel.helpers import LatentTap, load_tiny

pytestmark = pytest.mark.gpu

SIZE = 64


@pytest.fixture(scope="module")
def tiny_cuda(tmp_path_factory):
    return load_tiny("cuda", tmp_path_factory.mktemp("synthetic"))


def build(components, graphed: bool, **settings) -> StreamDiffusion:
    config = StreamConfig(width=SIZE, height=SIZE, **settings)
    stream = StreamDiffusion(components, config, prompt="a forest", negative_prompt="fog")
    return accelerate(stream, "cudagraph") if graphed else stream


def frames(count: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(3)
    return [
        torch.randint(0, 256, (SIZE, SIZE, 3), generator=generator, dtype=torch.uint8).cuda()
        for _ in range(count)
    ]


def slot_angles(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    a, b = a.flatten(1).double(), b.flatten(1).double()
    return ((a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1))).clamp(-1.0, 1.0).acos()


def assert_follows(out: torch.Tensor, expected: torch.Tensor, other: torch.Tensor) -> None:
    """`out` is far closer to `expected` than `expected` is to `other`."""
    error = (out - expected).abs().max().item()
    gap = (expected - other).abs().max().item()
    assert gap > 1e-2
    assert error < 0.2 * gap, f"off by {error}, while the alternative is {gap} away"


def test_fresh_noise_is_drawn_anew_on_every_replay(tiny_cuda):
    stream = build(tiny_cuda, True, mode="txt2img", t_index_list=(0, 32), cfg_type="none")
    tap = LatentTap(stream)
    seed_noise = stream.noise_for_seed(stream.config.seed)
    for _ in range(3):
        stream.txt2img()
        assert torch.equal(stream.current_noise(), seed_noise)
    stream.update(noise="fresh")
    noises, latents = [], []
    for _ in range(5):
        stream.txt2img()
        noises.append(stream.current_noise())
        latents.append(tap.latest.clone())
    for before, after in zip([seed_noise, *noises], noises, strict=False):
        assert not torch.allclose(before, after)
    for before, after in zip(latents, latents[1:], strict=False):
        assert (after - before).abs().max().item() > 1e-2
    assert stream.accelerator.captures == 1


def test_a_re_seed_between_replays_restarts_the_same_sequence(tiny_cuda):
    stream = build(tiny_cuda, True, t_index_list=(32, 45), noise="fresh", seed=5)
    inputs = frames(8)
    stream(inputs[0])
    stream.update(seed=6)
    first = []
    for pixels in inputs[1:4]:
        stream(pixels)
        first.append(stream.current_noise())
    stream.update(seed=5)
    stream(inputs[4])
    stream.update(seed=6)
    for pixels, expected in zip(inputs[5:8], first, strict=True):
        stream(pixels)
        assert torch.equal(stream.current_noise(), expected)
    assert stream.accelerator.captures == 1


def test_drift_under_the_graph_turns_by_noise_drift_a_replay(tiny_cuda):
    stream = build(tiny_cuda, True, t_index_list=(32, 45), noise="drift", noise_drift=0.2)
    before = stream.noise_for_seed(stream.config.seed)
    for pixels in frames(5):
        stream(pixels)
        after = stream.current_noise()
        expected = torch.full((2,), 0.2, dtype=torch.float64, device=after.device)
        torch.testing.assert_close(slot_angles(before, after), expected, rtol=0, atol=1e-3)
        before = after
    assert stream.accelerator.captures == 1


@pytest.mark.parametrize("noise", ["fresh", "drift"])
def test_the_graph_draws_the_eager_sequence(tiny_cuda, noise):
    settings = {"t_index_list": (32, 45), "noise": noise, "noise_drift": 0.3}
    eager, graphed = build(tiny_cuda, False, **settings), build(tiny_cuda, True, **settings)
    eager_tap, graphed_tap = LatentTap(eager), LatentTap(graphed)
    previous = None
    for index, pixels in enumerate(frames(5)):
        eager(pixels)
        graphed(pixels)
        torch.testing.assert_close(graphed.current_noise(), eager.current_noise())
        # The first frame also fills the buffer and leaves it again as the second output.
        if index >= 2:
            assert_follows(graphed_tap.latest, eager_tap.latest, previous)
        previous = eager_tap.latest.clone()
    assert graphed.accelerator.captures == 1


@pytest.mark.parametrize("cfg_type", ["full", "self", "initialize"])
def test_guidance_crossing_one_takes_effect_without_recapture(tiny_cuda, cfg_type):
    settings = {"t_index_list": (32, 45), "cfg_type": cfg_type}
    live = build(tiny_cuda, True, guidance_scale=3.0, **settings)
    guided = build(tiny_cuda, False, guidance_scale=3.0, **settings)
    unguided = build(tiny_cuda, False, guidance_scale=1.0, **settings)
    taps = [LatentTap(stream) for stream in (live, guided, unguided)]
    changes = {2: 0.5, 4: 3.0}
    for index, pixels in enumerate(frames(6)):
        if index in changes:
            live.update(guidance_scale=changes[index])
        for stream in (live, guided, unguided):
            stream(pixels)
        out, with_guidance, without = (tap.latest for tap in taps)
        # Output lags input by one frame: frame 3 is the first made wholly below 1.0.
        if index in (0, 1, 5):
            assert_follows(out, with_guidance, without)
        if index == 3:
            assert_follows(out, without, with_guidance)
    assert live.accelerator.captures == 1


def test_a_dropped_graphed_pipeline_does_not_break_the_next_capture(tiny_cuda):
    old = build(tiny_cuda, True, t_index_list=(45,))
    old(frames(1)[0])
    gc.disable()
    try:
        del old  # garbage in a reference cycle (pipeline <-> accelerator) until collected
        new = build(tiny_cuda, True, t_index_list=(45,), noise="fresh")

        def collect_while_capturing(module, args):
            # The cycle collector can run at any allocation; here it runs mid-capture.
            if torch.cuda.is_current_stream_capturing():
                gc.collect()

        hook = new.unet.register_forward_pre_hook(collect_while_capturing)
        try:
            for pixels in frames(3):
                new(pixels)
        finally:
            hook.remove()
    finally:
        gc.enable()
    assert new.accelerator.captures == 1
