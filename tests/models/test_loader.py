"""load_components on synthetic models and diffusers folders, and its errors."""

from __future__ import annotations

import shutil

import pytest
import torch
from diffusers import AutoencoderKL, AutoencoderTiny, LCMScheduler, UNet2DConditionModel
from safetensors.torch import load_file
from transformers import CLIPTextModel

from bridge.models import Components, family_of, load_components


@pytest.fixture(scope="module")
def tiny(synthetic_cache) -> Components:
    return load_components("synthetic:tiny", cache_dir=synthetic_cache)


def test_synthetic_tiny_loads_every_component_with_its_class(tiny):
    assert isinstance(tiny.unet, UNet2DConditionModel)
    assert isinstance(tiny.vae, AutoencoderKL)
    assert isinstance(tiny.text_encoder, CLIPTextModel)
    assert isinstance(tiny.scheduler, LCMScheduler)
    assert tiny.tokenizer.model_max_length == 77
    assert tiny.family == "sd15"
    assert "synthetic:tiny" in tiny.source


def test_synthetic_tiny_loads_the_weights_that_were_saved(tiny, tiny_folder):
    saved = load_file(tiny_folder / "unet" / "diffusion_pytorch_model.safetensors")
    loaded = tiny.unet.state_dict()
    assert saved.keys() == loaded.keys()
    assert all(torch.equal(saved[key], loaded[key]) for key in saved)
    saved_text = load_file(tiny_folder / "text_encoder" / "model.safetensors")
    loaded_text = tiny.text_encoder.state_dict()
    assert all(torch.equal(saved_text[key], loaded_text[key]) for key in saved_text)


def test_tiny_unet_denoises_a_64px_frame_from_the_text_encoders_output(tiny):
    ids = tiny.tokenizer(
        ["a red fox"], padding="max_length", max_length=77, truncation=True, return_tensors="pt"
    ).input_ids
    with torch.no_grad():
        context = tiny.text_encoder(ids)[0]
        noise = tiny.unet(torch.randn(1, 4, 8, 8), 999, encoder_hidden_states=context).sample
        image = tiny.vae.decode(noise).sample
    assert context.shape == (1, 77, 32)
    assert noise.shape == (1, 4, 8, 8)
    assert image.shape == (1, 3, 64, 64)
    assert torch.isfinite(image).all()


def test_components_are_frozen_and_in_eval_mode(tiny):
    for module in (tiny.unet, tiny.vae, tiny.text_encoder):
        assert not module.training
        assert not any(parameter.requires_grad for parameter in module.parameters())


def test_scheduler_is_lcm_with_stable_diffusion_betas(tiny):
    config = tiny.scheduler.config
    assert (config.beta_start, config.beta_end, config.beta_schedule) == (
        0.00085,
        0.012,
        "scaled_linear",
    )
    assert config.num_train_timesteps == 1000


def test_dtype_applies_to_every_component():
    half = load_components("synthetic:tiny", vae="tiny", dtype=torch.bfloat16)
    for module in (half.unet, half.vae, half.text_encoder):
        assert {parameter.dtype for parameter in module.parameters()} == {torch.bfloat16}


def test_vae_tiny_gives_the_models_own_taesd(tiny_folder):
    components = load_components("synthetic:tiny", vae="tiny")
    assert isinstance(components.vae, AutoencoderTiny)
    saved = load_file(tiny_folder / "taesd" / "diffusion_pytorch_model.safetensors")
    loaded = components.vae.state_dict()
    assert all(torch.equal(saved[key], loaded[key]) for key in saved)


def test_vae_folder_picks_its_class_from_the_config(tiny_folder):
    assert isinstance(
        load_components("synthetic:tiny", vae=str(tiny_folder / "taesd")).vae, AutoencoderTiny
    )
    # A whole pipeline folder also works as a VAE source: its vae/ subfolder is used.
    assert isinstance(load_components("synthetic:tiny", vae=str(tiny_folder)).vae, AutoencoderKL)


def test_vae_tiny_without_a_cached_taesd_says_how_to_fetch_it(
    tiny_checkpoint, tiny_folder, hf_cache
):
    # A single-file model has no taesd/ beside it, so the family's TAESD is looked up.
    with pytest.raises(FileNotFoundError, match="madebyollin/taesd") as error:
        load_components(str(tiny_checkpoint), config=str(tiny_folder), vae="tiny")
    assert "hf download madebyollin/taesd" in str(error.value)
    assert str(hf_cache) in str(error.value)


def test_a_diffusers_folder_loads_like_the_synthetic_name(tiny_folder, tmp_path, tiny, run_tiny):
    copy = shutil.copytree(tiny_folder, tmp_path / "my-model")
    components = load_components(copy)
    assert components.source == str(copy)
    for expected, actual in zip(run_tiny(tiny), run_tiny(components), strict=True):
        assert torch.equal(expected, actual)


def test_a_folder_without_a_scheduler_gets_lcm_defaults(tiny_folder, tmp_path):
    copy = shutil.copytree(tiny_folder, tmp_path / "no-scheduler")
    shutil.rmtree(copy / "scheduler")
    scheduler = load_components(str(copy)).scheduler
    assert isinstance(scheduler, LCMScheduler)
    assert scheduler.config.beta_schedule == "scaled_linear"


def test_family_follows_the_text_width_of_the_unet(tiny):
    assert family_of(tiny.unet) == "sd15"
    with torch.device("meta"):
        sd21 = UNet2DConditionModel(
            block_out_channels=(32, 64),
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=1024,
        )
    assert family_of(sd21) == "sd21"


def test_a_missing_path_is_named_in_the_error(tmp_path):
    missing = tmp_path / "nowhere" / "model.safetensors"
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        load_components(str(missing))


def test_a_file_with_another_extension_is_refused_by_name(tmp_path):
    weights = tmp_path / "model.bin"
    weights.write_bytes(b"\0")
    with pytest.raises(ValueError, match=r"model\.bin.*\.safetensors or \.ckpt"):
        load_components(str(weights))


def test_a_folder_that_is_not_a_model_names_what_it_lacks(tiny_folder):
    with pytest.raises(FileNotFoundError, match=r"no unet/, vae/, text_encoder/, tokenizer/"):
        load_components(str(tiny_folder / "unet"))


def test_config_is_refused_for_a_folder(tiny_folder):
    with pytest.raises(ValueError, match="config="):
        load_components(str(tiny_folder), config=str(tiny_folder))


def test_a_vae_that_is_not_an_autoencoder_is_refused(tiny_folder):
    with pytest.raises(ValueError, match="UNet2DConditionModel"):
        load_components("synthetic:tiny", vae=str(tiny_folder / "unet"))


def test_an_sdxl_unet_without_its_second_text_encoder_is_refused_before_loading(
    tiny_folder, tmp_path
):
    copy = shutil.copytree(tiny_folder, tmp_path / "xl")
    config_file = copy / "unet" / "config.json"
    config_file.write_text(
        config_file.read_text().replace(
            '"addition_embed_type": null', '"addition_embed_type": "text_time"'
        )
    )
    (copy / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="SDXL UNet but no text_encoder_2/, tokenizer_2/"):
        load_components(str(copy))


def test_unknown_synthetic_model_is_refused():
    with pytest.raises(ValueError, match="synthetic:tiny"):
        load_components("synthetic:huge")
