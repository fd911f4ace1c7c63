"""Synthetic models: real architectures, seeded weights, written once as a diffusers folder."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from diffusers import AutoencoderKL, AutoencoderTiny, UNet2DConditionModel
from safetensors import safe_open
from safetensors.torch import load_file
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from bridge.models import ensure_synthetic
from bridge.models.synthetic import SPECS


def _parameters(module: torch.nn.Module) -> int:
    return sum(parameter.numel() for parameter in module.parameters())


def test_tiny_folder_has_diffusers_layout(tiny_folder):
    index = json.loads((tiny_folder / "model_index.json").read_text())
    assert index["unet"] == ["diffusers", "UNet2DConditionModel"]
    assert index["scheduler"] == ["diffusers", "LCMScheduler"]
    for weights in (
        "unet/diffusion_pytorch_model.safetensors",
        "vae/diffusion_pytorch_model.safetensors",
        "taesd/diffusion_pytorch_model.safetensors",
        "text_encoder/model.safetensors",
        "tokenizer/vocab.json",
        "tokenizer/merges.txt",
    ):
        assert (tiny_folder / weights).is_file(), weights


def test_tiny_is_built_once_and_reused(tiny_folder):
    weights = tiny_folder / "unet" / "diffusion_pytorch_model.safetensors"
    before = weights.stat().st_mtime_ns
    assert ensure_synthetic("synthetic:tiny", tiny_folder.parent) == tiny_folder
    assert weights.stat().st_mtime_ns == before
    # Only finished folders are left: the build folder was renamed into place.
    names = [path.name for path in tiny_folder.parent.iterdir()]
    assert tiny_folder.name in names
    assert not [name for name in names if name.startswith(".")]


def test_same_name_gives_same_weights_in_another_cache(tiny_folder, tmp_path):
    other = ensure_synthetic("tiny", tmp_path)
    assert other != tiny_folder
    for weights in (
        "unet/diffusion_pytorch_model.safetensors",
        "vae/diffusion_pytorch_model.safetensors",
        "taesd/diffusion_pytorch_model.safetensors",
        "text_encoder/model.safetensors",
    ):
        first, second = load_file(tiny_folder / weights), load_file(other / weights)
        assert first.keys() == second.keys()
        assert all(torch.equal(first[key], second[key]) for key in first)


def test_unknown_synthetic_name_lists_the_known_ones(tmp_path):
    with pytest.raises(ValueError, match="synthetic:sd-turbo"):
        ensure_synthetic("synthetic:sdxl", tmp_path)
    assert not any(tmp_path.iterdir())


def test_tiny_latents_are_an_eighth_of_the_frame(tiny_folder):
    vae = AutoencoderKL.from_pretrained(tiny_folder / "vae")
    taesd = AutoencoderTiny.from_pretrained(tiny_folder / "taesd")
    frame = torch.zeros((1, 3, 64, 64))
    with torch.no_grad():
        assert vae.encode(frame).latent_dist.mean.shape == (1, 4, 8, 8)
        assert taesd.encode(frame).latents.shape == (1, 4, 8, 8)
        assert taesd.decode(torch.zeros((1, 4, 8, 8))).sample.shape == (1, 3, 64, 64)


# Parameter counts of the released models these architectures copy.
@pytest.mark.parametrize(
    ("name", "unet_parameters", "text_parameters", "text_width"),
    [
        ("sd-turbo", 865_910_724, 340_387_840, 1024),
        ("sd15", 859_520_964, 123_060_480, 768),
    ],
)
def test_large_architectures_match_the_released_models(
    name, unet_parameters, text_parameters, text_width
):
    spec = SPECS[name]
    # On the meta device the modules get shapes but no memory, so this is quick.
    with torch.device("meta"):
        unet = UNet2DConditionModel(**spec.unet)
        text_encoder = CLIPTextModel(CLIPTextConfig(**spec.text_encoder))
        vae = AutoencoderKL(**spec.vae)
        taesd = AutoencoderTiny(**spec.taesd)
    assert _parameters(unet) == unet_parameters
    assert _parameters(text_encoder) == text_parameters
    assert unet.config.cross_attention_dim == text_encoder.config.hidden_size == text_width
    assert _parameters(vae) == 83_653_863
    assert _parameters(taesd) == 2_445_063
    assert spec.half_precision


def test_tiny_unet_accepts_the_tiny_text_encoder_output():
    spec = SPECS["tiny"]
    assert spec.unet["cross_attention_dim"] == spec.text_encoder["hidden_size"]
    assert not spec.half_precision


@pytest.mark.slow
def test_sd_turbo_folder_stores_half_precision_weights_and_loads(tmp_path):
    folder = ensure_synthetic("sd-turbo", tmp_path)
    with safe_open(
        folder / "unet" / "diffusion_pytorch_model.safetensors", framework="pt"
    ) as weights:
        assert weights.get_tensor("conv_in.weight").dtype == torch.float16
    unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet", torch_dtype=torch.float16)
    assert unet.config.cross_attention_dim == 1024
    assert _parameters(unet) == 865_910_724
    # The folder takes gigabytes; do not leave it for pytest's kept temporary folders.
    shutil.rmtree(folder)


# Parameter counts of the released SDXL-Turbo and SDXS-512 networks these architectures copy.
def test_sdxl_turbo_architecture_matches_the_released_model():
    spec = SPECS["sdxl-turbo"]
    with torch.device("meta"):
        unet = UNet2DConditionModel(**spec.unet)
        text_encoder = CLIPTextModel(CLIPTextConfig(**spec.text_encoder))
        text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**spec.text_encoder_2))
    assert _parameters(unet) == 2_567_463_684
    assert _parameters(text_encoder) == 123_060_480
    assert _parameters(text_encoder_2) == 694_659_840
    widths = text_encoder.config.hidden_size + text_encoder_2.config.hidden_size
    assert unet.config.cross_attention_dim == widths == 2048
    assert spec.vae["scaling_factor"] == 0.13025 and spec.half_precision


def test_sdxs_architecture_is_the_pruned_sd21_unet():
    spec = SPECS["sdxs"]
    with torch.device("meta"):
        unet = UNet2DConditionModel(**spec.unet)
    assert _parameters(unet) == 318_695_364
    assert unet.mid_block is None
    assert unet.config.cross_attention_dim == spec.text_encoder["hidden_size"] == 1024


def test_tiny_xl_unet_takes_both_text_encoders_and_sdxls_six_size_ids():
    spec = SPECS["tiny-xl"]
    unet, first, second = spec.unet, spec.text_encoder, spec.text_encoder_2
    assert unet["cross_attention_dim"] == first["hidden_size"] + second["hidden_size"]
    pooled = second["projection_dim"]
    assert (
        unet["projection_class_embeddings_input_dim"]
        == pooled + 6 * unet["addition_time_embed_dim"]
    )
    # diffusers tells SDXL's encoders apart by width when it converts a single file.
    assert first["hidden_size"] != second["hidden_size"]
    assert not spec.half_precision
