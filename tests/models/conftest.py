"""Fixtures for model loading: the synthetic tiny and tiny-xl models, a fake Hugging Face cache,
original-layout (LDM) checkpoints of both and a LoRA file for the tiny model."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from diffusers import StableDiffusionPipeline, UNet2DConditionModel
from peft import LoraConfig, inject_adapter_in_model
from peft.utils import get_peft_model_state_dict
from transformers import CLIPTextModel

from bridge.models import Components, ensure_synthetic
from tests.models.helpers import write_ldm_checkpoint

PROMPT = "a red fox in the snow"


@pytest.fixture(autouse=True)
def isolated_caches(monkeypatch, tmp_path, synthetic_cache):
    """Every test sees an empty hub cache, no downloads, and this test run's synthetic models."""
    monkeypatch.setenv("SD_BRIDGE_CACHE", str(synthetic_cache))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf-hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def synthetic_cache(tmp_path_factory) -> Path:
    """The SD_BRIDGE_CACHE of this test run: synthetic models are built there once."""
    return tmp_path_factory.mktemp("sd-bridge")


@pytest.fixture(scope="session")
def tiny_folder(synthetic_cache) -> Path:
    """The diffusers folder of synthetic:tiny."""
    return ensure_synthetic("tiny", synthetic_cache / "synthetic")


@pytest.fixture(scope="session")
def tiny_xl_folder(synthetic_cache) -> Path:
    """The diffusers folder of synthetic:tiny-xl."""
    return ensure_synthetic("tiny-xl", synthetic_cache / "synthetic")


@pytest.fixture(scope="session")
def tiny_xl_checkpoint(tiny_xl_folder, tmp_path_factory) -> Path:
    """synthetic:tiny-xl as a single original-layout (SDXL) .safetensors checkpoint."""
    path = tmp_path_factory.mktemp("ldm-xl") / "tiny-xl.safetensors"
    return write_ldm_checkpoint(tiny_xl_folder, path)


@pytest.fixture
def hf_cache(tmp_path) -> Path:
    """The (empty) hub cache that HF_HUB_CACHE points to in this test."""
    cache = tmp_path / "hf-hub"
    cache.mkdir()
    return cache


@pytest.fixture(scope="session")
def run_tiny() -> Callable[[Components], tuple[torch.Tensor, torch.Tensor]]:
    """Run a fixed prompt through the text encoder and fixed inputs through the UNet."""

    def run(components: Components) -> tuple[torch.Tensor, torch.Tensor]:
        tokens = components.tokenizer(
            [PROMPT],
            padding="max_length",
            max_length=components.tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        )
        generator = torch.Generator().manual_seed(0)
        latents = torch.randn((1, 4, 8, 8), generator=generator)
        context = torch.randn((1, 77, 32), generator=generator)
        with torch.no_grad():
            embedding = components.text_encoder(tokens.input_ids)[0]
            noise = components.unet(latents, 500, encoder_hidden_states=context).sample
        return embedding, noise

    return run


@pytest.fixture(scope="session")
def tiny_checkpoint(tiny_folder, tmp_path_factory) -> Path:
    """synthetic:tiny as a single original-layout .safetensors checkpoint."""
    return write_ldm_checkpoint(tiny_folder, tmp_path_factory.mktemp("ldm") / "tiny.safetensors")


@pytest.fixture(scope="session")
def tiny_lora(tiny_folder, tmp_path_factory) -> Path:
    """A rank-4 LoRA of the tiny UNet's attention and the text encoder, with random weights."""
    unet = UNet2DConditionModel.from_pretrained(tiny_folder, subfolder="unet")
    text_encoder = CLIPTextModel.from_pretrained(tiny_folder, subfolder="text_encoder")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        # init_lora_weights=False draws both factors at random, so the update is not zero.
        unet_config = LoraConfig(
            r=4,
            lora_alpha=4,
            target_modules=["to_q", "to_k", "to_v", "to_out.0"],
            init_lora_weights=False,
        )
        text_config = LoraConfig(
            r=4,
            lora_alpha=4,
            target_modules=["q_proj", "k_proj", "v_proj", "out_proj"],
            init_lora_weights=False,
        )
        inject_adapter_in_model(unet_config, unet)
        inject_adapter_in_model(text_config, text_encoder)
    folder = tmp_path_factory.mktemp("lora")
    StableDiffusionPipeline.save_lora_weights(
        folder,
        unet_lora_layers=get_peft_model_state_dict(unet),
        text_encoder_lora_layers=get_peft_model_state_dict(text_encoder),
        weight_name="tiny_lora.safetensors",
    )
    return folder / "tiny_lora.safetensors"
