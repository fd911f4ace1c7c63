"""Compiling repeated blocks (`compile_scope` "blocks", bridge/accel/regions.py) on the CPU.

Dynamo traces for real here; the blocks are compiled with its "eager" backend (see conftest.py). The
same blocks through Inductor, inside a CUDA graph, are tested on a GPU by the "blocks" cases of
test_cudagraph.py and test_graph_lora.py.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import UNet2DConditionModel
from torch._dynamo.utils import counters

from bridge.accel import _compiled_networks, accelerate
from bridge.accel.regions import REGION_CLASSES, compile_regions
from bridge.models.controlnet import load_controlnet
from bridge.models.ip_adapter import load_ip_adapter
from bridge.models.live_lora import load_live_loras
from bridge.models.lora import check_loras
from bridge.models.synthetic_lora import write_synthetic_lora
from bridge.stream import ControlNet, StreamConfig, StreamDiffusion
from bridge.stream.ip_adapter import install

EAGER = {"backend": "eager", "dynamic": False}
SIZE = 64


def unet_inputs(unet) -> tuple[tuple, dict]:
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(1, 4, SIZE // 8, SIZE // 8, generator=generator)
    text = torch.randn(1, 77, unet.config.cross_attention_dim, generator=generator)
    return (latents, torch.tensor([500])), {"encoder_hidden_states": text}


def compiled_blocks(model) -> list[str]:
    return [
        name for name, module in model.named_modules() if module._compiled_call_impl is not None
    ]


@torch.no_grad()
def test_a_copy_runs_each_block_compiled_and_the_model_stays_as_it_was(tiny):
    unet = tiny.unet
    blocks = [name for name, m in unet.named_modules() if type(m).__name__ in REGION_CLASSES]
    copy, count = compile_regions(unet, **EAGER)
    args, kwargs = unet_inputs(unet)
    expected = unet(*args, **kwargs).sample
    assert count == len(blocks) == 12
    assert copy is not unet and type(copy) is type(unet)
    assert compiled_blocks(copy) == blocks
    assert compiled_blocks(unet) == []
    # The weights are the model's own tensors, not copies.
    assert all(a is b for a, b in zip(copy.parameters(), unet.parameters(), strict=True))
    assert torch.equal(copy(*args, **kwargs).sample, expected)
    assert torch.equal(unet(*args, **kwargs).sample, expected)


@torch.no_grad()
def test_dynamo_traces_each_kind_and_size_of_block_once(tiny):
    unet = tiny.unet
    seen = set()

    def note(module, args, kwargs):
        shapes = tuple(tuple(a.shape) for a in args if isinstance(a, torch.Tensor))
        seen.add((type(module).__name__, shapes, tuple(sorted(kwargs))))

    hooks = [
        module.register_forward_pre_hook(note, with_kwargs=True)
        for module in unet.modules()
        if type(module).__name__ in REGION_CLASSES
    ]
    args, kwargs = unet_inputs(unet)
    unet(*args, **kwargs)
    for hook in hooks:
        hook.remove()
    copy, count = compile_regions(unet, **EAGER)
    counters.clear()
    copy(*args, **kwargs)
    copy(*args, **kwargs)
    # 12 blocks of 9 kinds and input sizes: 9 traces, and none again on the second call.
    assert len(seen) == 9 < count
    assert counters["stats"]["unique_graphs"] == len(seen)


@torch.no_grad()
def test_a_live_lora_scale_reaches_the_compiled_copy(tiny, tmp_path):
    lora = write_synthetic_lora(tiny, tmp_path / "lora.safetensors", seed=1)
    live = load_live_loras(tiny, check_loras([(lora, 1.0)]))
    copy, _ = compile_regions(tiny.unet, **EAGER)
    args, kwargs = unet_inputs(tiny.unet)
    before = copy(*args, **kwargs).sample
    live.set_scale(0, -1.0)
    after = copy(*args, **kwargs).sample
    assert (after - before).abs().max().item() > 1e-3
    assert torch.equal(after, tiny.unet(*args, **kwargs).sample)


def frames(stream: StreamDiffusion, count: int) -> list[np.ndarray]:
    rng = np.random.default_rng(3)
    pictures = [rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8) for _ in range(count)]
    with torch.inference_mode():
        return [np.array(stream(picture)) for picture in pictures]


def latents(stream: StreamDiffusion, count: int) -> list[torch.Tensor]:
    """The finished latents of `count` frames: what the UNet's changes reach before 8-bit pixels
    could round a small change away."""
    captured: list[torch.Tensor] = []
    decode = stream.decode
    stream.decode = lambda x: captured.append(x.clone()) or decode(x)
    frames(stream, count)
    stream.decode = decode
    return captured


def test_live_changes_of_a_controlnet_an_ip_adapter_and_the_feature_bank_reach_the_blocks(
    tiny, tmp_path, eager_compile
):
    cache = tmp_path / "models"
    loaded = tiny
    # Plain random UNet weights: synthetic:tiny's see-through weights keep the deeper levels,
    # where the feature bank works, out of the output.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        tiny = dataclasses.replace(tiny, unet=UNet2DConditionModel.from_config(tiny.unet.config))
    adapter = load_ip_adapter(tiny, "synthetic:tiny", cache_dir=cache)
    install(tiny.unet, adapter.empty_tokens())
    controlnet = load_controlnet("synthetic:controlnet-tiny", tiny.unet.config, cache_dir=cache)
    config = StreamConfig(
        width=SIZE, height=SIZE, t_index_list=(20, 35), cfg_type="self", feature_bank_size=1
    )
    style = np.random.default_rng(5).integers(0, 256, (48, 48, 3), dtype=np.uint8)
    tokens = adapter.image_tokens(style)

    def pipeline() -> StreamDiffusion:
        stream = StreamDiffusion(
            tiny, config, prompt="a fox", controlnets=[ControlNet(controlnet, scale=0.5)]
        )
        stream.image_prompt.set_image_tokens(tokens)
        stream.image_prompt.set_scale(0.6)
        return stream

    def live_run(stream: StreamDiffusion, applied: int = 5) -> list[torch.Tensor]:
        """Two frames, then one frame after each live change (the first `applied` of them
        made, a frame without a change in place of the others)."""
        changes = [
            lambda: stream.image_prompt.set_scale(1.0),
            lambda: stream.controlnets.set_scale(0, 1.5),
            lambda: stream.update(feature_bank_strength=0.3, feature_bank_threshold=0.0),
            lambda: stream.controlnets.set_enabled(0, False),
            lambda: stream.update(feature_bank_size=0),
        ]
        made = latents(stream, 2)
        for change in changes[:applied]:
            change()
            made += latents(stream, 1)
        return made + [frame for _ in changes[applied:] for frame in latents(stream, 1)]

    expected = live_run(pipeline())
    # Each change shows in the frame after it: a compiled copy that missed one would differ.
    for index in range(5):
        fewer = live_run(pipeline(), applied=index)
        assert torch.equal(fewer[index + 1], expected[index + 1])
        moved = (fewer[index + 2] - expected[index + 2]).abs().max().item()
        # The runs are equal bit for bit up to the change (above), so any difference is its own.
        assert moved > 0, f"change {index} did not move the next frame's latents"
    stream = pipeline()
    # What accelerate(stream, "compile", compile_scope="blocks") runs, with Dynamo's eager
    # backend in place of Inductor (the eager_compile fixture).
    _compiled_networks(stream, "default", "blocks", Path(tmp_path)).install()
    assert stream.unet is not tiny.unet and stream.vae is not tiny.vae
    assert len(compiled_blocks(stream.unet)) == 12 and len(compiled_blocks(stream.vae)) == 8
    assert len(compiled_blocks(stream.controlnets.controlnets[0].model)) > 0
    counters.clear()
    got = live_run(stream)
    assert counters["stats"]["unique_graphs"] > 0  # the blocks ran compiled
    assert all(torch.equal(a, b) for a, b in zip(got, expected, strict=True))
    # The components stay as they were: other pipelines on them run uncompiled.
    assert compiled_blocks(tiny.unet) == [] and compiled_blocks(loaded.vae) == []


def test_an_unknown_compile_scope_is_refused_in_one_sentence(tiny):
    stream = StreamDiffusion(tiny, StreamConfig(width=SIZE, height=SIZE), prompt="a fox")
    with pytest.raises(ValueError, match=r"^compile scope 'layers' is unknown; use one of model, "):
        accelerate(stream, "none", compile_scope="layers")
