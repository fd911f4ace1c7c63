"""Which Stable Diffusion family a model belongs to, read from its configuration files.

The stream pipeline runs UNet latent diffusion models with four latent channels, whatever their
size: SD 1.x and its distillations, SD 2.x (v-prediction included: the scheduler configuration
says so), SDXL, and pruned UNets such as SDXS. Their family decides how prompts become the UNet's
conditioning:

- ``sd15``: one CLIP ViT-L text encoder, 768-wide tokens;
- ``sd21``: one OpenCLIP ViT-H text encoder, 1024-wide tokens;
- ``sdxl``: CLIP ViT-L and OpenCLIP ViT-bigG side by side, 2048-wide tokens, plus the
  ``text_time`` added conditioning (the pooled text embedding and the size and crop ids).

The family is read from the UNet configuration, not from a list of known models: the added
conditioning (``addition_embed_type``) marks SDXL, the text width (``cross_attention_dim``) the
other two. Models of other kinds (a transformer instead of a UNet, as in SD3 and FLUX, or a UNet
with extra input channels for inpainting) are refused with one sentence.

One setting of the pipeline itself, in ``model_index.json``, also shapes SDXL's conditioning:
``force_zeros_for_empty_prompt`` (see :func:`force_zeros_for_empty_prompt`).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

FAMILIES = ("sd15", "sd21", "sdxl")
LATENT_CHANNELS = 4
# The published widths of the two text encoders' tokens.
SD21_TEXT_WIDTH = 1024


def family_of_config(unet_config: Mapping[str, Any]) -> str:
    """The family of a UNet from its diffusers configuration (``unet/config.json``)."""
    if unet_config.get("addition_embed_type") == "text_time":
        return "sdxl"
    if unet_config.get("cross_attention_dim") == SD21_TEXT_WIDTH:
        return "sd21"
    return "sd15"


def check_unet_config(unet_config: Mapping[str, Any], source: str) -> str:
    """The family of a UNet configuration, or ValueError saying why the pipeline cannot run it."""
    kind = unet_config.get("_class_name", "UNet2DConditionModel")
    if kind != "UNet2DConditionModel":
        raise ValueError(
            f"{source} has a {kind}, not a UNet2DConditionModel; only UNet latent diffusion "
            "models (SD 1.x, SD 2.x, SDXL and their distillations) are supported."
        )
    channels = (unet_config.get("in_channels"), unet_config.get("out_channels"))
    if channels != (LATENT_CHANNELS, LATENT_CHANNELS):
        raise ValueError(
            f"{source} has a UNet with {channels[0]} input and {channels[1]} output channels "
            f"(an inpainting or depth model); pick a text-to-image model with "
            f"{LATENT_CHANNELS} of each."
        )
    addition = unet_config.get("addition_embed_type")
    if addition not in (None, "text_time"):
        raise ValueError(
            f"{source} has a UNet with {addition!r} added conditioning; only SDXL's "
            "'text_time' (or none, as in SD 1.x and 2.x) is supported."
        )
    return family_of_config(unet_config)


def read_model_index(folder: Path) -> dict[str, Any]:
    """The pipeline configuration in ``folder/model_index.json``; empty if there is none."""
    index_file = folder / "model_index.json"
    return json.loads(index_file.read_text(encoding="utf-8")) if index_file.is_file() else {}


def force_zeros_for_empty_prompt(model_index: Mapping[str, Any]) -> bool:
    """Whether an SDXL pipeline conditions on zeros, not on the encoding of "", when it is
    given no negative prompt.

    SDXL was trained that way: diffusers' SDXL pipelines read this flag from
    ``model_index.json`` and take it as true where it is missing, and SDXL base and SDXL-Turbo
    publish it true.
    """
    return bool(model_index.get("force_zeros_for_empty_prompt", True))


def check_model_index(folder: Path, source: str) -> None:
    """Refuse a diffusers folder whose pipeline is not a UNet latent diffusion model.

    SD3, FLUX and their kin keep a ``transformer`` where Stable Diffusion keeps its ``unet``;
    they are named in one sentence instead of failing somewhere inside loading.
    """
    index = read_model_index(folder)
    if "transformer" in index or (
        (folder / "transformer").is_dir() and not (folder / "unet").is_dir()
    ):
        pipeline = index.get("_class_name", "a diffusion transformer pipeline")
        raise ValueError(
            f"{source} is a {pipeline} (a transformer model such as SD3 or FLUX), which is not "
            "supported; pick a UNet model: SD 1.x, SD 2.x, SDXL, SD-Turbo, SDXL-Turbo or SDXS."
        )
