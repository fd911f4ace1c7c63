"""CUDA graph replay of the frame step: same frames as eager, live changes without re-capture.

Each comparison is made on the latents the step hands to the decoder and on the pixels, and
each test also asserts that what it compares could differ: the next frame, or another prompt,
moves the output by far more than the tolerance. A graph that replays a stale frame or ignores
a prompt change therefore fails. The synthetic models pass the picture through (see
bridge/models/passthrough.py), so pixels vary with the input too.
"""

from __future__ import annotations

import pytest

from bridge.accel import accelerate
from bridge.stream import StreamConfig, StreamDiffusion
from tests.accel.helpers import (
    LATENT_GAP,
    LATENT_TOLERANCE,
    SIZE,
    Tapped,
    apart,
    build,
    frames,
    load_tiny,
    same,
)


@pytest.fixture(scope="module")
def tiny_cuda(tmp_path_factory):
    return load_tiny("cuda", tmp_path_factory.mktemp("synthetic"))


@pytest.fixture(scope="module")
def tiny_cpu(tmp_path_factory):
    return load_tiny("cpu", tmp_path_factory.mktemp("synthetic"))


def pair(components, **settings) -> tuple[Tapped, Tapped]:
    """An eager pipeline and a graphed one with the same settings."""
    return build(components, **settings), build(components, "cudagraph", **settings)


@pytest.mark.gpu
@pytest.mark.parametrize("cfg_type", ["none", "full", "self", "initialize"])
@pytest.mark.parametrize("steps", [(45,), (32, 45), (0, 16, 32, 45)])
def test_graph_replay_gives_the_eager_frames(tiny_cuda, cfg_type, steps):
    eager, graphed = pair(tiny_cuda, cfg_type=cfg_type, t_index_list=steps, guidance_scale=1.4)
    previous = None
    for index, pixels in enumerate(frames()):
        expected, actual = eager(pixels), graphed(pixels)
        assert same(actual, expected)
        # Output lags input by k - 1 frames, so the first k outputs all show the first input;
        # from then on each output is its own, and a replay of a stale frame fails above.
        if index >= len(steps):
            assert apart(expected, previous)
        previous = expected
    assert graphed.accelerator.captures == 1


@pytest.mark.gpu
def test_shape_keeping_changes_apply_without_recapture(tiny_cuda):
    eager, graphed = pair(tiny_cuda, cfg_type="self", t_index_list=(32, 45))
    # A third pipeline takes each change one change late: the newest change alone must move
    # the output away from it, so every change is shown to matter, not only the first.
    behind = build(tiny_cuda, cfg_type="self", t_index_list=(32, 45))
    changes = [
        lambda s: s.set_prompt("a desert at noon"),
        lambda s: s.update(guidance_scale=2.5, delta=0.5),
        lambda s: s.update(seed=99),
        lambda s: s.update(t_index_list=(20, 40)),
    ]
    for index, pixels in enumerate(frames(13)):
        if index % 3 == 2:
            newest = index // 3
            changes[newest](eager)
            changes[newest](graphed)
            if newest > 0:
                changes[newest - 1](behind)
        expected, actual, reference = eager(pixels), graphed(pixels), behind(pixels)
        assert same(actual, expected)
        if index % 3 == 0 and index > 0:
            # A frame after each change has gone through both steps with it in effect.
            assert apart(expected, reference), f"change {index // 3 - 1} left the output as it was"
    assert graphed.accelerator.captures == 1


@pytest.mark.gpu
def test_a_prompt_change_reaches_the_graphed_output(tiny_cuda):
    eager, graphed = pair(tiny_cuda, cfg_type="self", t_index_list=(32, 45))
    unchanged = build(tiny_cuda, cfg_type="self", t_index_list=(32, 45))
    inputs = frames(5)
    for pixels in inputs[:2]:
        assert same(graphed(pixels), eager(pixels))
        unchanged(pixels)
    graphed.set_prompt("a desert at noon")
    eager.set_prompt("a desert at noon")
    for index, pixels in enumerate(inputs[2:]):
        after, reference = graphed(pixels), unchanged(pixels)
        assert same(after, eager(pixels))
        if index >= 1:  # the first output after the change had one of its two steps before it
            assert apart(after, reference)
    assert graphed.accelerator.captures == 1


@pytest.mark.gpu
def test_a_shape_change_recaptures(tiny_cuda):
    eager, graphed = pair(tiny_cuda, cfg_type="self", t_index_list=(32, 45))
    for pixels in frames(2):
        assert same(graphed(pixels), eager(pixels))
    graphed.update(cfg_type="full")
    eager.update(cfg_type="full")
    for pixels in frames(3):
        assert same(graphed(pixels), eager(pixels))
    assert graphed.accelerator.captures == 2


@pytest.mark.gpu
def test_txt2img_replays_too(tiny_cuda):
    eager, graphed = pair(tiny_cuda, mode="txt2img", t_index_list=(0, 32), cfg_type="none")
    for _ in range(4):
        before = graphed()
        assert same(before, eager())
    graphed.set_prompt("a storm")
    eager.set_prompt("a storm")
    for _ in range(3):
        after = graphed()
        assert same(after, eager())
    # txt2img saturates pixels, so the prompt's change is asserted on the latents.
    assert (after[0] - before[0]).abs().mean().item() > LATENT_GAP
    assert graphed.accelerator.captures == 1


@pytest.mark.gpu
@pytest.mark.parametrize("scope", ["model", "blocks"])
def test_compile_mode_gives_the_eager_frames(tiny_cuda, tmp_path, scope):
    eager = build(tiny_cuda, cfg_type="self", t_index_list=(32, 45))
    config = StreamConfig(width=SIZE, height=SIZE, cfg_type="self", t_index_list=(32, 45))
    compiled = Tapped(
        accelerate(
            StreamDiffusion(tiny_cuda, config, prompt="a forest", negative_prompt="fog"),
            "compile",
            compile_scope=scope,
            cache_dir=tmp_path,
        )
    )
    blocks = [m for m in compiled.stream.unet.modules() if m._compiled_call_impl is not None]
    # The tiny UNet has 12 blocks; "model" wraps the whole UNet instead.
    assert len(blocks) == (12 if scope == "blocks" else 0)
    previous = None
    for index, pixels in enumerate(frames(4)):
        (latents_c, out_c), (latents_e, out_e) = compiled(pixels), eager(pixels)
        assert (latents_c - latents_e).abs().max().item() <= 5 * LATENT_TOLERANCE
        assert (out_c.int() - out_e.int()).abs().max().item() <= 3
        if index >= 2:  # two steps: the first two outputs both show the first input
            assert apart((latents_e, out_e), previous)
        previous = (latents_e, out_e)


def test_the_comparisons_above_can_fail_on_cpu(tiny_cpu):
    """On the eager path ("none"): the next frame, and another prompt, move the output by far
    more than the graph-versus-eager tolerance, in latents and in pixels alike."""
    stream = build(tiny_cpu, cfg_type="self", t_index_list=(32, 45))
    inputs = frames(6, device="cpu")
    outputs = [stream(pixels) for pixels in inputs]
    for before, after in zip(outputs[1:], outputs[2:], strict=False):  # outputs 0 and 1: input 0
        assert apart(after, before)
        assert not same(after, before)
    again = build(tiny_cpu, cfg_type="self", t_index_list=(32, 45))
    assert all(same(again(p), out) for p, out in zip(inputs, outputs, strict=True))
    forest = build(tiny_cpu, cfg_type="self", t_index_list=(32, 45))
    desert = build(tiny_cpu, cfg_type="self", t_index_list=(32, 45))
    desert.set_prompt("a desert at noon")
    for pixels in inputs:
        assert apart(desert(pixels), forest(pixels))
