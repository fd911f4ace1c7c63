"""Under a CUDA graph: a live LoRA scale change needs no re-capture and matches the eager step,
also when the UNet is compiled, whole or block by block.

Latents are compared, not pixels: they are what the UNet's LoRA layers act on, and they differ
where rounding to 8-bit pixels could hide a small difference.
"""

from __future__ import annotations

import pytest
import torch

from bridge.accel import accelerate
from bridge.models import ensure_synthetic
from bridge.models.live_lora import load_live_loras
from bridge.models.lora import check_loras
from bridge.stream import StreamConfig, StreamDiffusion
from tests.accel.helpers import LatentTap, load_tiny
from tests.models.loras import write_lora

pytestmark = pytest.mark.gpu

SIZE = 64


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("synthetic")


@pytest.fixture(scope="module")
def loras(cache, tmp_path_factory):
    """Two LoRA files of the tiny model: attention and text encoder; attention and convolutions."""
    tiny = ensure_synthetic("tiny", cache / "synthetic")
    folder = tmp_path_factory.mktemp("lora")
    return [
        write_lora(tiny, folder / "a.safetensors", seed=0, alpha=16, text_modules=("q_proj",)),
        write_lora(tiny, folder / "b.safetensors", seed=1, rank=2, unet_modules=("to_v", "conv1")),
    ]


def build(cache, loras, scales, graphed: bool, accel: str = "cudagraph", scope: str = "model"):
    components = load_tiny("cuda", cache)
    live = load_live_loras(components, check_loras(list(zip(loras, scales, strict=True))))
    config = StreamConfig(width=SIZE, height=SIZE, t_index_list=(20,), cfg_type="none")
    stream = StreamDiffusion(components, config, prompt="a forest")
    if not graphed:
        return stream, live
    return accelerate(stream, accel, compile_scope=scope, cache_dir=cache / "compiled"), live


def frames(count: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(3)
    return [
        torch.randint(0, 256, (SIZE, SIZE, 3), generator=generator, dtype=torch.uint8).cuda()
        for _ in range(count)
    ]


@pytest.mark.parametrize(
    ("accel", "scope"), [("cudagraph", "model"), ("compile", "model"), ("compile", "blocks")]
)
def test_a_scale_change_under_the_graph_needs_no_recapture_and_equals_eager(
    cache, loras, accel, scope
):
    graphed, graphed_loras = build(cache, loras, (1.0, 0.5), graphed=True, accel=accel, scope=scope)
    eager, eager_loras = build(cache, loras, (1.0, 0.5), graphed=False)
    graphed_tap, eager_tap = LatentTap(graphed), LatentTap(eager)
    pixels = frames(1)[0]  # one step and one input: each frame depends on the scales alone

    def two_frames() -> tuple[torch.Tensor, torch.Tensor]:
        for _ in range(2):
            graphed.img2img(pixels)
            eager.img2img(pixels)
        torch.cuda.synchronize()
        return graphed_tap.latest.clone(), eager_tap.latest.clone()

    with torch.inference_mode():
        graphed_before, eager_before = two_frames()
        for live in (graphed_loras, eager_loras):
            live.set_scale(0, -0.75)
            live.set_scale(1, 1.5)
        graphed_after, eager_after = two_frames()
    gap = (eager_after - eager_before).abs().max().item()
    assert gap > 1e-2
    for graphed_latents, eager_latents in (
        (graphed_before, eager_before),
        (graphed_after, eager_after),
    ):
        error = (graphed_latents - eager_latents).abs().max().item()
        assert error < 0.05 * gap, f"graphed off eager by {error}; the scale change moved {gap}"
    assert graphed.accelerator.captures == 1


def test_the_graph_follows_the_scale_as_a_pipeline_started_at_it_does(cache, loras):
    graphed, live = build(cache, loras, (1.0, 0.5), graphed=True)
    started, _ = build(cache, loras, (-0.75, 0.5), graphed=False)
    graphed_tap, started_tap = LatentTap(graphed), LatentTap(started)
    pixels = frames(1)[0]
    with torch.inference_mode():
        graphed.img2img(pixels)
        graphed.img2img(pixels)
        at_start = graphed_tap.latest.clone()
        # Adapter 0 changes the text encoder too: the prompt is encoded again, as the engine
        # does, into the embedding tensor the graph reads.
        assert live.set_scale(0, -0.75)
        graphed.prompts.forget()
        graphed.set_prompt("a forest")
        graphed.img2img(pixels)
        started.img2img(pixels)
        torch.cuda.synchronize()
    moved = (graphed_tap.latest - at_start).abs().max().item()
    error = (graphed_tap.latest - started_tap.latest).abs().max().item()
    assert moved > 1e-2
    assert error < 0.05 * moved, f"off by {error} while the change moved the latents {moved}"
    assert graphed.accelerator.captures == 1
