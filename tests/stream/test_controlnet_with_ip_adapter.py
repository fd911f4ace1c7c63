"""A ControlNet and an IP-Adapter in one pipeline: each still does exactly what it does alone.

The ControlNet reads the text states only; the IP-Adapter's picture tokens go to the UNet's
cross-attention through its own processors. So with one of them at scale 0 the pipeline must
give what the other alone gives, and with both on something different from either.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bridge.models import load_components
from bridge.models.controlnet import load_controlnet
from bridge.models.ip_adapter import load_ip_adapter
from bridge.stream import ControlNet, StreamConfig, StreamDiffusion
from bridge.stream.ip_adapter import install

SIZE = 32
# As in test_controlnet.py: what a ControlNet or a picture must change, on average, at least.
LATENT_GAP = 0.05


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """synthetic:tiny with its IP-Adapter installed, the adapter's live prompt, a ControlNet,
    and synthetic:tiny without an adapter."""
    cache = tmp_path_factory.mktemp("controlnet-ip-adapter")
    components = load_components("synthetic:tiny", vae="tiny", cache_dir=cache)
    adapter = load_ip_adapter(components, "synthetic:tiny", cache_dir=cache)
    image_prompt = install(components.unet, adapter.empty_tokens())
    image_prompt.set_image_tokens(adapter.image_tokens(style_picture()))
    controlnet = load_controlnet(
        "synthetic:controlnet-tiny", components.unet.config, cache_dir=cache
    )
    plain = load_components("synthetic:tiny", vae="tiny", cache_dir=cache)
    return components, image_prompt, controlnet, plain


def style_picture() -> np.ndarray:
    pixels = np.zeros((48, 48, 3), dtype=np.uint8)
    pixels[:, :24] = (230, 40, 20)
    pixels[:, 24:] = (20, 60, 220)
    return pixels


def frames(count: int) -> list[np.ndarray]:
    """Frames with a coloured square at a place of its own each: their edges differ."""
    rng = np.random.default_rng(7)
    made = []
    for _ in range(count):
        picture = np.zeros((SIZE, SIZE, 3), np.uint8)
        top, left = rng.integers(2, SIZE // 2, 2)
        picture[top : top + SIZE // 3, left : left + SIZE // 3] = rng.integers(80, 256, 3)
        made.append(picture)
    return made


def run(models, ip_scale: float | None, control_scale: float | None, **settings) -> torch.Tensor:
    """The finished latents of three frames, with the IP-Adapter at `ip_scale` (None: the
    model without an adapter) and, unless `control_scale` is None, a canny ControlNet at that
    scale."""
    adapted, image_prompt, controlnet, plain = models
    components = plain if ip_scale is None else adapted
    if ip_scale is not None:
        image_prompt.set_scale(ip_scale)
    controlnets = [] if control_scale is None else [ControlNet(controlnet, scale=control_scale)]
    config = StreamConfig(width=SIZE, height=SIZE, **settings)
    stream = StreamDiffusion(
        components, config, prompt="a fox", negative_prompt="fog", controlnets=controlnets
    )
    captured: list[torch.Tensor] = []
    decode = stream.decode
    stream.decode = lambda x: captured.append(x.clone()) or decode(x)
    with torch.inference_mode():
        for picture in frames(3):
            stream.img2img(picture)
    return torch.cat(captured)


@pytest.mark.parametrize(
    "settings",
    [
        {"t_index_list": (32,), "cfg_type": "none"},
        {"t_index_list": (32, 45), "cfg_type": "full", "guidance_scale": 1.5},
    ],
    ids=["one-step", "two-steps-full-cfg"],
)
def test_each_at_scale_0_leaves_what_the_other_gives_alone_and_both_differ_from_either(
    models, settings
):
    ip_alone = run(models, 0.8, None, **settings)
    control_alone = run(models, 0.0, 1.0, **settings)
    both = run(models, 0.8, 1.0, **settings)
    torch.testing.assert_close(run(models, 0.8, 0.0, **settings), ip_alone, rtol=0, atol=1e-6)
    # The ControlNet on the model without any adapter gives what it gives beside one at 0.
    torch.testing.assert_close(run(models, None, 1.0, **settings), control_alone, rtol=0, atol=1e-6)
    neither = run(models, None, None, **settings)
    assert (both - ip_alone).abs().mean().item() > LATENT_GAP
    assert (both - control_alone).abs().mean().item() > LATENT_GAP
    assert (ip_alone - neither).abs().mean().item() > LATENT_GAP


def test_the_controlnet_sees_the_same_inputs_and_gives_the_same_residuals_whatever_the_picture(
    models,
):
    """At one step each frame's latents come from the frame alone, so the ControlNet's inputs
    and outputs must not move with the IP-Adapter's scale: it never sees the picture tokens."""
    controlnet = models[2]
    seen: list[list[torch.Tensor]] = []

    def record_inputs(module, args, kwargs):
        seen[-1].extend(t.clone() for t in (*args, *kwargs.values()) if torch.is_tensor(t))

    def record_outputs(module, args, kwargs, output):
        down, middle = output[0], output[1]
        seen[-1].extend(t.clone() for t in (*down, middle))

    handles = [
        controlnet.register_forward_pre_hook(record_inputs, with_kwargs=True),
        controlnet.register_forward_hook(record_outputs, with_kwargs=True),
    ]
    try:
        for ip_scale in (0.8, 0.0):
            seen.append([])
            run(models, ip_scale, 1.0, t_index_list=(32,), cfg_type="none")
    finally:
        for handle in handles:
            handle.remove()
    with_picture, without = seen
    assert len(with_picture) == len(without) > 0
    for a, b in zip(with_picture, without, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
