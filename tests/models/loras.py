"""LoRA files for the tiny model: random ones that fit, and broken ones that do not."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from diffusers import StableDiffusionPipeline, UNet2DConditionModel
from peft import LoraConfig, inject_adapter_in_model
from peft.utils import get_peft_model_state_dict
from safetensors.torch import load_file, save_file
from transformers import CLIPTextModel

ATTENTION = ("to_q", "to_k", "to_v", "to_out.0")
TEXT_ATTENTION = ("q_proj", "k_proj", "v_proj", "out_proj")


def write_lora(
    model_folder: Path,
    path: Path,
    *,
    seed: int,
    rank: int = 4,
    alpha: int = 4,
    unet_modules: Sequence[str] = ATTENTION,
    text_modules: Sequence[str] = (),
) -> Path:
    """A LoRA of the model in `model_folder` with random factors on the named modules."""
    unet = UNet2DConditionModel.from_pretrained(model_folder, subfolder="unet")
    text_encoder = CLIPTextModel.from_pretrained(model_folder, subfolder="text_encoder")
    layers = {}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        # init_lora_weights=False draws both factors at random, so the update is not zero.
        config = LoraConfig(
            r=rank, lora_alpha=alpha, target_modules=list(unet_modules), init_lora_weights=False
        )
        inject_adapter_in_model(config, unet)
        layers["unet_lora_layers"] = get_peft_model_state_dict(unet)
        # The adapter's configuration travels in the file, alpha included.
        layers["unet_lora_adapter_metadata"] = config.to_dict()
        if text_modules:
            config = LoraConfig(
                r=rank, lora_alpha=alpha, target_modules=list(text_modules), init_lora_weights=False
            )
            inject_adapter_in_model(config, text_encoder)
            layers["text_encoder_lora_layers"] = get_peft_model_state_dict(text_encoder)
            layers["text_encoder_lora_adapter_metadata"] = config.to_dict()
    StableDiffusionPipeline.save_lora_weights(path.parent, weight_name=path.name, **layers)
    return path


def rewrite(source: Path, path: Path, change) -> Path:
    """A copy of a LoRA file with `change(key, tensor) -> (key, tensor)` applied to each entry."""
    save_file(dict(change(key, tensor) for key, tensor in load_file(source).items()), path)
    return path
