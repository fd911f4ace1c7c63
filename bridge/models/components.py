"""The loaded parts of a Stable Diffusion model, and which family it belongs to."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from diffusers import AutoencoderKL, AutoencoderTiny, LCMScheduler, UNet2DConditionModel
from transformers import CLIPTextModel, PreTrainedTokenizerBase

SUPPORTED_FAMILIES = ("sd15", "sd21")


@dataclass
class Components:
    """What the stream pipeline runs: the networks on one device and dtype, in eval mode.

    ``family`` is ``"sd15"`` or ``"sd21"``; ``source`` says, for people, where the model came from.
    """

    unet: UNet2DConditionModel
    vae: AutoencoderKL | AutoencoderTiny
    text_encoder: CLIPTextModel
    tokenizer: PreTrainedTokenizerBase
    scheduler: LCMScheduler
    family: str
    source: str


def family_of_config(unet_config: Mapping[str, Any]) -> str:
    """The family of a UNet described by its diffusers configuration; see :func:`family_of`."""
    if unet_config.get("addition_embed_type") == "text_time":
        return "sdxl"
    if unet_config.get("cross_attention_dim") == 1024:
        return "sd21"
    return "sd15"


def family_of(unet: UNet2DConditionModel) -> str:
    """``"sd21"`` for a UNet conditioned on 1024-wide text (OpenCLIP ViT-H), ``"sdxl"`` for SDXL.

    Every other UNet is ``"sd15"``: one CLIP text encoder and no added conditioning, as in
    SD 1.x (768-wide text) and the synthetic tiny model.
    """
    return family_of_config(unet.config)
