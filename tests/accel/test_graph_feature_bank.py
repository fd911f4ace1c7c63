"""Under a CUDA graph: the feature bank and latent feedback compute what the eager step does.

The graph reads the bank's rings and positions, the injection strength and threshold and the
feedback weight from tensors; these tests check that each replay sees the bank's current
contents and every live change, with one capture per bank size. The synthetic models' see-through
weights route the picture around self-attention (bridge/models/passthrough.py), so the tiny model
here gets a UNet of plain random weights, where the bank changes the frames. Latents are compared,
as in test_graph_noise_guidance.py.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from diffusers import UNet2DConditionModel

from bridge.accel import accelerate
from bridge.stream import StreamConfig, StreamDiffusion
from tests.accel.helpers import LatentTap, load_tiny

pytestmark = pytest.mark.gpu

SIZE = 64
BANK = {"feature_bank_size": 2, "feature_bank_strength": 0.8, "feature_bank_threshold": 0.0}
# Graph and eager run the same kernels in float32: their latents agree to float error.
TOLERANCE = 1e-4
# What the bank, the injection and the feedback must move the latents by at least (measured on
# the CPU with this UNet: 0.011-0.019, 0.005 and 2.0 at the largest).
EFFECT = 1e-3


@pytest.fixture(scope="module")
def attentive_cuda(tmp_path_factory):
    components = load_tiny("cuda", tmp_path_factory.mktemp("synthetic"))
    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_config(components.unet.config)
    unet = unet.to("cuda", torch.float32).eval().requires_grad_(False)
    return dataclasses.replace(components, unet=unet)


class Tapped:
    """A pipeline and a tap on the latents its frame step decodes."""

    def __init__(self, components, graphed: bool, **settings) -> None:
        config = StreamConfig(width=SIZE, height=SIZE, **settings)
        stream = StreamDiffusion(components, config, prompt="a forest", negative_prompt="fog")
        self.stream = accelerate(stream, "cudagraph") if graphed else stream
        self.tap = LatentTap(self.stream)

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        self.stream(pixels)
        return self.tap.latest.clone()


def pair(components, **settings) -> tuple[Tapped, Tapped]:
    """An eager pipeline and a graphed one with the same settings."""
    return Tapped(components, False, **settings), Tapped(components, True, **settings)


def panning(count: int) -> list[torch.Tensor]:
    """A coloured band moving across a background by an eighth of the frame per frame."""
    generator = torch.Generator().manual_seed(3)
    colours = torch.randint(0, 256, (2, 3), generator=generator, dtype=torch.uint8)
    pictures = []
    for index in range(count):
        picture = colours[0].expand(SIZE, SIZE, 3).clone()
        start = (index * SIZE // 8) % SIZE
        picture[:, start : start + SIZE // 2] = colours[1]
        pictures.append(picture.cuda())
    return pictures


def gap(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


@pytest.mark.parametrize("cfg_type", ["none", "full", "self", "initialize"])
@pytest.mark.parametrize("steps", [(45,), (32, 45)])
def test_graph_replay_with_a_bank_gives_the_eager_frames(attentive_cuda, cfg_type, steps):
    settings = {"t_index_list": steps, "cfg_type": cfg_type, **BANK}
    eager, graphed = pair(attentive_cuda, **settings)
    plain = Tapped(attentive_cuda, False, t_index_list=steps, cfg_type=cfg_type)
    largest_bank_effect = 0.0
    for pixels in panning(6):
        expected, actual, unbanked = eager(pixels), graphed(pixels), plain(pixels)
        assert gap(actual, expected) < TOLERANCE
        largest_bank_effect = max(largest_bank_effect, gap(expected, unbanked))
    # The bank moved the frames by far more than the tolerance: the graph saw its contents.
    assert largest_bank_effect > EFFECT
    # The first frame fills the bank eagerly; the graph is captured once, on the second.
    assert graphed.stream.accelerator.captures == 1


def test_strength_threshold_and_feedback_change_without_recapture(attentive_cuda):
    settings = {"t_index_list": (32, 45), "cfg_type": "self", **BANK}
    eager, graphed = pair(attentive_cuda, **settings)
    fixed = Tapped(attentive_cuda, False, **settings)
    without_feedback = Tapped(attentive_cuda, False, **settings)
    changes = {
        3: {"feature_bank_strength": 0.0},
        5: {"feature_bank_strength": 1.0, "feature_bank_threshold": 0.5},
        7: {"latent_feedback": 0.5},
    }
    from_fixed, from_feedback = {}, {}
    for index, pixels in enumerate(panning(10)):
        change = changes.get(index, {})
        for stream in (eager, graphed):
            stream.stream.update(**change)
        if "latent_feedback" not in change:
            without_feedback.stream.update(**change)
        expected, actual = eager(pixels), graphed(pixels)
        assert gap(actual, expected) < TOLERANCE
        from_fixed[index] = gap(expected, fixed(pixels))
        from_feedback[index] = gap(expected, without_feedback(pixels))
    # Each change moved the frames by far more than the tolerance; output lags input by one
    # frame, and feedback enters with the input latent, so it shows one frame later.
    assert from_fixed[2] < TOLERANCE
    assert max(from_fixed[index] for index in range(3, 7)) > EFFECT
    assert from_feedback[7] < TOLERANCE
    assert from_feedback[8] > EFFECT
    assert graphed.stream.accelerator.captures == 1


def test_a_reset_refills_the_bank_and_replays_the_same_graph(attentive_cuda):
    settings = {"t_index_list": (45,), **BANK}
    eager, graphed = pair(attentive_cuda, **settings)
    frames = panning(8)
    for index, pixels in enumerate(frames):
        if index == 4:
            eager.stream.reset()
            graphed.stream.reset()
        assert gap(graphed(pixels), eager(pixels)) < TOLERANCE
    assert graphed.stream.accelerator.captures == 1


def test_a_new_bank_size_captures_the_graph_again(attentive_cuda):
    settings = {"t_index_list": (32, 45), **BANK}
    eager, graphed = pair(attentive_cuda, **settings)
    for index, pixels in enumerate(panning(9)):
        if index in (3, 6):
            size = {3: 4, 6: 0}[index]
            eager.stream.update(feature_bank_size=size)
            graphed.stream.update(feature_bank_size=size)
        assert gap(graphed(pixels), eager(pixels)) < TOLERANCE
    assert graphed.stream.accelerator.captures == 3
