"""CUDA graph replay of the frame step: same frames as eager, live changes without re-capture."""

from __future__ import annotations

import pytest
import torch

from bridge.accel import accelerate
from bridge.models import load_components
from bridge.stream import StreamConfig, StreamDiffusion

pytestmark = pytest.mark.gpu

SIZE = 64


@pytest.fixture(scope="module")
def tiny_cuda(tmp_path_factory):
    return load_components(
        "synthetic:tiny",
        vae="tiny",
        device="cuda",
        dtype=torch.float32,
        cache_dir=tmp_path_factory.mktemp("synthetic"),
    )


def pair(components, **settings):
    """An eager pipeline and a graphed one with the same settings."""
    config = StreamConfig(width=SIZE, height=SIZE, **settings)
    eager = StreamDiffusion(components, config, prompt="a forest", negative_prompt="fog")
    graphed = accelerate(
        StreamDiffusion(components, config, prompt="a forest", negative_prompt="fog"), "cudagraph"
    )
    return eager, graphed


def frames(count=6):
    generator = torch.Generator().manual_seed(3)
    return [
        torch.randint(0, 256, (SIZE, SIZE, 3), generator=generator, dtype=torch.uint8).cuda()
        for _ in range(count)
    ]


def close(a, b):
    return (a.int() - b.int()).abs().max().item() <= 1


@pytest.mark.parametrize("cfg_type", ["none", "full", "self", "initialize"])
@pytest.mark.parametrize("steps", [(45,), (32, 45), (0, 16, 32, 45)])
def test_graph_replay_gives_the_eager_frames(tiny_cuda, cfg_type, steps):
    eager, graphed = pair(tiny_cuda, cfg_type=cfg_type, t_index_list=steps, guidance_scale=1.4)
    for pixels in frames():
        assert close(graphed(pixels), eager(pixels))
    assert graphed.accelerator.captures == 1


def test_shape_keeping_changes_apply_without_recapture(tiny_cuda):
    eager, graphed = pair(tiny_cuda, cfg_type="self", t_index_list=(32, 45))
    inputs = frames(12)
    changes = [
        lambda s: s.set_prompt("a desert at noon"),
        lambda s: s.update(guidance_scale=2.5, delta=0.5),
        lambda s: s.update(seed=99),
        lambda s: s.update(t_index_list=(20, 40)),
    ]
    for index, pixels in enumerate(inputs):
        if index % 3 == 2:
            change = changes[index // 3]
            change(eager)
            change(graphed)
        assert close(graphed(pixels), eager(pixels))
    assert graphed.accelerator.captures == 1


def test_a_shape_change_recaptures(tiny_cuda):
    eager, graphed = pair(tiny_cuda, cfg_type="self", t_index_list=(32, 45))
    for pixels in frames(2):
        assert close(graphed(pixels), eager(pixels))
    graphed.update(cfg_type="full")
    eager.update(cfg_type="full")
    for pixels in frames(3):
        assert close(graphed(pixels), eager(pixels))
    assert graphed.accelerator.captures == 2


def test_txt2img_replays_too(tiny_cuda):
    eager, graphed = pair(tiny_cuda, mode="txt2img", t_index_list=(0, 32), cfg_type="none")
    for _ in range(4):
        assert close(graphed.txt2img(), eager.txt2img())
    graphed.set_prompt("a storm")
    eager.set_prompt("a storm")
    for _ in range(3):
        assert close(graphed.txt2img(), eager.txt2img())
    assert graphed.accelerator.captures == 1


def test_compile_mode_gives_the_eager_frames(tiny_cuda, tmp_path):
    config = StreamConfig(width=SIZE, height=SIZE, cfg_type="self", t_index_list=(32, 45))
    eager = StreamDiffusion(tiny_cuda, config, prompt="a forest")
    compiled = accelerate(
        StreamDiffusion(tiny_cuda, config, prompt="a forest"), "compile", cache_dir=tmp_path
    )
    for pixels in frames(4):
        out_c, out_e = compiled(pixels), eager(pixels)
        assert (out_c.int() - out_e.int()).abs().max().item() <= 3
