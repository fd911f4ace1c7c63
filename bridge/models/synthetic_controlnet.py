"""Synthetic ControlNets: the architecture of a ControlNet for each synthetic model, random weights.

A ControlNet is a copy of its UNet's encoder and middle block, a small network that embeds the
control image, and one "zero convolution" per residual it hands the UNet. diffusers'
``ControlNetModel.from_unet`` builds exactly that from a UNet configuration, and that is how
these are made: on the UNet configuration of the synthetic model they go with. For
``controlnet-sd-turbo`` that is stabilityai/sd-turbo's unet/config.json (SD 2.1), which gives the
config.json of published SD 2.1 ControlNets in diffusers layout (block_out_channels (320, 640,
1280, 1280), attention_head_dim (5, 10, 20, 20), cross_attention_dim 1024, linear projections,
conditioning_embedding_out_channels (16, 32, 96, 256)); for ``controlnet-sd15`` it gives that of
lllyasviel/control_v11p_sd15_canny. Speed depends on the architecture, not on the weights, so a
benchmark with them is honest.

Trained ControlNets start with their zero convolutions at zero and learn them; here they get small
seeded random weights instead, and the control image's embedding is initialised to keep its
signal, so that the residuals are not zero and a control image visibly changes the picture (on
``controlnet-tiny`` too). Each is written once as an ordinary diffusers
folder (``config.json`` and ``diffusion_pytorch_model.safetensors``) and loaded through the same
code as a downloaded ControlNet.

``synthetic:controlnet-tiny``      for ``synthetic:tiny`` (float32, a few hundred kB)
``synthetic:controlnet-tiny-xl``   for ``synthetic:tiny-xl`` (SDXL's added conditioning)
``synthetic:controlnet-sd-turbo``  for ``synthetic:sd-turbo`` (float16, 364,228,240 parameters)
``synthetic:controlnet-sd15``      for ``synthetic:sd15`` (float16, 361,279,120 parameters)
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path

import torch
from diffusers import ControlNetModel, UNet2DConditionModel

from bridge.models.synthetic import (
    RECIPE_VERSION,
    SPECS,
    SYNTHETIC_PREFIX,
    build_once,
    default_synthetic_root,
    synthetic_name,
)

CONTROLNET_BASES: Mapping[str, str] = {
    "controlnet-tiny": "tiny",
    "controlnet-tiny-xl": "tiny-xl",
    "controlnet-sd-turbo": "sd-turbo",
    "controlnet-sd15": "sd15",
}
"""Each synthetic ControlNet and the synthetic model whose UNet it is made for."""
SEED = 6
# How strongly a zero convolution passes its input on: enough for a visible effect, small
# enough that the UNet's own prediction still dominates.
GAIN = 0.5
# SiLU halves a signal's size or more: each convolution of the embedding doubles it back.
EMBEDDING_GAIN = 2.0


def is_synthetic_controlnet(name: str) -> bool:
    """Whether ``name`` is ``synthetic:controlnet-...``, one of ``CONTROLNET_BASES``."""
    return synthetic_name(name) in CONTROLNET_BASES


def ensure_synthetic_controlnet(name: str, root: str | Path | None = None) -> Path:
    """Folder of the synthetic ControlNet ``name`` (``synthetic:controlnet-tiny``), built once.

    The folder is ``<root>/<name>-v<recipe>``, ``root`` by default the synthetic models' own.
    """
    bare = synthetic_name(name) or name
    if bare not in CONTROLNET_BASES:
        raise ValueError(
            f"Unknown synthetic ControlNet {name!r}; choose one of "
            f"{', '.join(SYNTHETIC_PREFIX + known for known in CONTROLNET_BASES)}."
        )
    root = Path(root) if root is not None else default_synthetic_root()
    folder = root / f"{bare}-v{RECIPE_VERSION}"
    return build_once(folder, lambda staging: write_synthetic_controlnet(bare, staging))


def write_synthetic_controlnet(name: str, folder: Path) -> None:
    """Write the diffusers folder of the synthetic ControlNet ``name`` into ``folder``."""
    spec = SPECS[CONTROLNET_BASES[name]]
    # Only the UNet's configuration is read: no weights are made for it.
    with torch.device("meta"):
        unet = UNet2DConditionModel(**spec.unet)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        controlnet = ControlNetModel.from_unet(unet, load_weights_from_unet=False)
        embedding = controlnet.controlnet_cond_embedding
        # Scaled to keep the picture's signal through the embedding's convolutions, where
        # diffusers' default initialisation lets it fade to nearly nothing.
        for convolution in (embedding.conv_in, *embedding.blocks):
            _scaled_normal(convolution, EMBEDDING_GAIN)
            torch.nn.init.zeros_(convolution.bias)
        _scaled_normal(embedding.conv_out, 1.0)
        for zero in (*controlnet.controlnet_down_blocks, controlnet.controlnet_mid_block):
            _scaled_normal(zero, GAIN)
    if spec.half_precision:
        controlnet.half()
    controlnet.save_pretrained(folder)


def _scaled_normal(convolution: torch.nn.Conv2d, gain: float) -> None:
    """Normal weights that pass an input on at about `gain` times its size."""
    fan_in = convolution.in_channels * convolution.kernel_size[0] * convolution.kernel_size[1]
    torch.nn.init.normal_(convolution.weight, std=gain / math.sqrt(fan_in))
