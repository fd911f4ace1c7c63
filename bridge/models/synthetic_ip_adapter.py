"""Synthetic IP-Adapters: the published architecture and file layout with seeded random weights.

Each is written once as h94/IP-Adapter lays its files out,

    <folder>/models/ip-adapter_<name>.safetensors   image_proj.* and ip_adapter.* tensors
    <folder>/models/image_encoder/                  CLIPVisionModelWithProjection

and then read by :func:`bridge.models.ip_adapter.load_ip_adapter` like a downloaded one. The
adapter of ``synthetic:<model>`` fits the UNet of ``synthetic:<model>``: a key and a value
projection for each of its cross-attention layers, numbered as diffusers reads them (1, 3, 5, ...
over the UNet's attention processors). Speed depends on the shapes, not on the weight values.

``tiny`` and ``tiny-xl`` (float32, for ``synthetic:tiny`` and ``synthetic:tiny-xl``; each builds
in well under a second)
    Image encoder: CLIP vision with hidden size 32, 2 layers, 4 heads, intermediate size 64,
    32x32 pictures in 8x8 patches, projection_dim 16. Image projection: 16 -> 4 tokens as wide
    as the model's text tokens (32, or 80 for ``tiny-xl``).

``sd15`` (float16, for ``synthetic:sd15``)
    h94/IP-Adapter's ``models/ip-adapter_sd15``: its image encoder (``models/image_encoder/
    config.json``: OpenCLIP ViT-H/14, hidden size 1280, 32 layers, 16 heads, intermediate size
    5120, 224x224 pictures in 14x14 patches, projection_dim 1024: 632,076,800 parameters) and
    its image projection from 1024 to 4 tokens 768 wide.

``sd-turbo`` (float16, for ``synthetic:sd-turbo`` and the SD 2.1 family)
    h94/IP-Adapter publishes no adapter for SD 2.1; this is the architecture of
    ``ip-adapter_sd15`` (the same ViT-H/14 image encoder, 4 tokens) with tokens 1024 wide, the
    width of SD 2.1's text tokens.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers import UNet2DConditionModel
from safetensors.torch import save_file
from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

from bridge.models.ip_adapter import IMAGE_ENCODER_FOLDER
from bridge.models.synthetic import SPECS, build_once, default_synthetic_root

RECIPE_VERSION = 1
IMAGE_TOKENS = 4
_SEED = 11

# h94/IP-Adapter models/image_encoder/config.json (OpenCLIP ViT-H/14 with its projection).
CLIP_VIT_H_VISION: Mapping[str, Any] = {
    "hidden_size": 1280,
    "intermediate_size": 5120,
    "num_hidden_layers": 32,
    "num_attention_heads": 16,
    "image_size": 224,
    "patch_size": 14,
    "projection_dim": 1024,
    "hidden_act": "gelu",
    "layer_norm_eps": 1e-5,
}
TINY_VISION: Mapping[str, Any] = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "image_size": 32,
    "patch_size": 8,
    "projection_dim": 16,
    "hidden_act": "gelu",
    "layer_norm_eps": 1e-5,
}


@dataclass(frozen=True)
class IPAdapterSpec:
    """A synthetic IP-Adapter: the model whose UNet it fits, its image encoder, its precision."""

    model: str
    image_encoder: Mapping[str, Any]
    half_precision: bool


IP_ADAPTER_SPECS: Mapping[str, IPAdapterSpec] = {
    "tiny": IPAdapterSpec("tiny", TINY_VISION, half_precision=False),
    "tiny-xl": IPAdapterSpec("tiny-xl", TINY_VISION, half_precision=False),
    "sd15": IPAdapterSpec("sd15", CLIP_VIT_H_VISION, half_precision=True),
    "sd-turbo": IPAdapterSpec("sd-turbo", CLIP_VIT_H_VISION, half_precision=True),
}


def ensure_synthetic_ip_adapter(name: str, root: str | Path | None = None) -> Path:
    """The weights file of the synthetic IP-Adapter for ``synthetic:<name>``, built on first use.

    The folder is ``<root>/ip-adapter-<name>-v<recipe>``; ``root`` defaults to the synthetic
    models' root. It is built beside it and renamed into place, so a reader never sees half.
    """
    if name not in IP_ADAPTER_SPECS:
        raise ValueError(
            f"there is no synthetic IP-Adapter for {name!r}; synthetic ones exist for "
            f"{', '.join('synthetic:' + known for known in IP_ADAPTER_SPECS)}."
        )
    root = Path(root) if root is not None else default_synthetic_root()
    file_name = f"ip-adapter_{name}.safetensors"
    folder = build_once(
        root / f"ip-adapter-{name}-v{RECIPE_VERSION}",
        lambda staging: write_synthetic_ip_adapter(
            IP_ADAPTER_SPECS[name], staging / "models", file_name
        ),
    )
    return folder / "models" / file_name


def write_synthetic_ip_adapter(spec: IPAdapterSpec, folder: Path, file_name: str) -> None:
    """Write the weights file and ``image_encoder`` folder of `spec` into `folder`."""
    unet_settings = SPECS[spec.model].unet
    text_width = unet_settings["cross_attention_dim"]
    dtype = torch.float16 if spec.half_precision else torch.float32
    generator = torch.Generator().manual_seed(_SEED)

    def draw(rows: int, columns: int) -> torch.Tensor:
        # Scaled like a trained projection: outputs of about the size of the inputs.
        return (torch.randn((rows, columns), generator=generator) / columns**0.5).to(dtype)

    embedding = spec.image_encoder["projection_dim"]
    tensors = {
        "image_proj.proj.weight": draw(IMAGE_TOKENS * text_width, embedding),
        "image_proj.proj.bias": torch.zeros(IMAGE_TOKENS * text_width, dtype=dtype),
        "image_proj.norm.weight": torch.ones(text_width, dtype=dtype),
        "image_proj.norm.bias": torch.zeros(text_width, dtype=dtype),
    }
    for key_id, width in cross_attention_layers(unet_settings):
        tensors[f"ip_adapter.{key_id}.to_k_ip.weight"] = draw(width, text_width)
        tensors[f"ip_adapter.{key_id}.to_v_ip.weight"] = draw(width, text_width)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / file_name))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(_SEED)
        encoder = CLIPVisionModelWithProjection(CLIPVisionConfig(**spec.image_encoder))
    encoder.to(dtype).save_pretrained(folder / IMAGE_ENCODER_FOLDER)


def cross_attention_layers(unet_settings: Mapping[str, Any]) -> list[tuple[int, int]]:
    """(key id, key width) of each cross-attention layer of a UNet, numbered as IP-Adapter files
    number them and diffusers reads them: 1, 3, 5, ... in the order of the UNet's processors."""
    with torch.device("meta"):
        unet = UNet2DConditionModel(**unet_settings)
    names = [name for name in unet.attn_processors if not name.endswith("attn1.processor")]
    return [
        (2 * index + 1, unet.get_submodule(name.removesuffix(".processor")).to_k.out_features)
        for index, name in enumerate(names)
    ]
