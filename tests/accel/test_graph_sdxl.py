"""CUDA graph replay of SDXL's frame step: the added conditioning is part of what the graph reads.

synthetic:tiny-xl has both text encoders and SDXL's ``text_time`` added conditioning. The graph
captures the UNet call with the packed prompt tensor (tokens and pooled embedding) and the size
ids; a prompt change overwrites the first in place, a size change the second (with a new capture,
since the shapes move). Each test also asserts that what it compares could differ, as in
test_cudagraph.py.
"""

from __future__ import annotations

import pytest

from bridge.accel import accelerate
from bridge.stream import StreamConfig, StreamDiffusion
from tests.accel.helpers import (
    LATENT_TOLERANCE,
    SIZE,
    Tapped,
    apart,
    build,
    frames,
    load_tiny,
    same,
)

# tiny-xl's prompt tint is fainter than tiny's: 0.049 and 2.8 levels between "a forest" and
# "a desert at noon" (CPU, t_index_list (32, 45)), so a prompt change is held to smaller gaps.
PROMPT_LATENT_GAP = 0.025
PROMPT_PIXEL_GAP = 1.5


@pytest.fixture(scope="module")
def tiny_xl_cuda(tmp_path_factory):
    return load_tiny("cuda", tmp_path_factory.mktemp("synthetic"), "tiny-xl")


@pytest.fixture(scope="module")
def tiny_xl_cpu(tmp_path_factory):
    return load_tiny("cpu", tmp_path_factory.mktemp("synthetic"), "tiny-xl")


@pytest.mark.gpu
@pytest.mark.parametrize("cfg_type", ["none", "full", "self", "initialize"])
def test_graph_replay_gives_the_eager_sdxl_frames(tiny_xl_cuda, cfg_type):
    settings = {"cfg_type": cfg_type, "t_index_list": (32, 45), "guidance_scale": 1.4}
    eager, graphed = build(tiny_xl_cuda, **settings), build(tiny_xl_cuda, "cudagraph", **settings)
    previous = None
    for index, pixels in enumerate(frames(6)):
        expected, actual = eager(pixels), graphed(pixels)
        assert same(actual, expected)
        if index >= 2:  # outputs 0 and 1 both show input 0
            assert apart(expected, previous)
        previous = expected
    assert graphed.accelerator.captures == 1


@pytest.mark.gpu
def test_a_prompt_change_reaches_the_graphed_sdxl_output(tiny_xl_cuda):
    settings = {"cfg_type": "self", "t_index_list": (32, 45)}
    eager, graphed = build(tiny_xl_cuda, **settings), build(tiny_xl_cuda, "cudagraph", **settings)
    unchanged = build(tiny_xl_cuda, **settings)
    inputs = frames(5)
    for pixels in inputs[:2]:
        assert same(graphed(pixels), eager(pixels))
        unchanged(pixels)
    graphed.set_prompt("a desert at noon")
    eager.set_prompt("a desert at noon")
    for index, pixels in enumerate(inputs[2:]):
        after, reference = graphed(pixels), unchanged(pixels)
        assert same(after, eager(pixels))
        if index >= 1:  # the first output after the change had one of its steps before it
            assert apart(after, reference, PROMPT_LATENT_GAP, PROMPT_PIXEL_GAP)
    assert graphed.accelerator.captures == 1


@pytest.mark.gpu
def test_a_wide_size_change_recaptures_with_new_size_ids(tiny_xl_cuda):
    settings = {"cfg_type": "none", "t_index_list": (32,)}
    eager, graphed = build(tiny_xl_cuda, **settings), build(tiny_xl_cuda, "cudagraph", **settings)
    for pixels in frames(2):
        assert same(graphed(pixels), eager(pixels))
    graphed.update(width=112)
    eager.update(width=112)
    for pixels in frames(3, width=112):
        assert same(graphed(pixels), eager(pixels))
    assert graphed.conditioning.time_ids.tolist() == [[64.0, 112.0, 0.0, 0.0, 64.0, 112.0]]
    assert graphed.accelerator.captures == 2


@pytest.mark.gpu
@pytest.mark.slow
def test_compile_mode_gives_the_eager_sdxl_frames(tiny_xl_cuda, tmp_path):
    eager = build(tiny_xl_cuda, cfg_type="self", t_index_list=(32, 45))
    config = StreamConfig(width=SIZE, height=SIZE, cfg_type="self", t_index_list=(32, 45))
    stream = StreamDiffusion(tiny_xl_cuda, config, prompt="a forest", negative_prompt="fog")
    compiled = Tapped(accelerate(stream, "compile", cache_dir=tmp_path))
    for pixels in frames(4):
        (latents_c, out_c), (latents_e, out_e) = compiled(pixels), eager(pixels)
        assert (latents_c - latents_e).abs().max().item() <= 5 * LATENT_TOLERANCE
        assert (out_c.int() - out_e.int()).abs().max().item() <= 3


def test_the_sdxl_comparisons_above_can_fail_on_cpu(tiny_xl_cpu):
    """On the eager path: the next frame, and another prompt, move the output by far more than
    the graph-versus-eager tolerance."""
    stream = build(tiny_xl_cpu, cfg_type="self", t_index_list=(32, 45))
    outputs = [stream(pixels) for pixels in frames(5, device="cpu")]
    for before, after in zip(outputs[1:], outputs[2:], strict=False):
        assert apart(after, before)
    other = build(tiny_xl_cpu, cfg_type="self", t_index_list=(32, 45))
    other.set_prompt("a desert at noon")
    moved = [other(pixels) for pixels in frames(5, device="cpu")]
    assert apart(moved[-1], outputs[-1], PROMPT_LATENT_GAP, PROMPT_PIXEL_GAP)
    assert not same(moved[-1], outputs[-1])
