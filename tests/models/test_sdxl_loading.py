"""SDXL through the real loaders: diffusers folders, single-file checkpoints, the hub cache."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from diffusers import (
    AutoencoderKL,
    AutoencoderTiny,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from peft import LoraConfig, inject_adapter_in_model
from peft.utils import get_peft_model_state_dict
from safetensors.torch import load_file
from transformers import CLIPTextModel, CLIPTextModelWithProjection

from bridge.models import load_components
from bridge.models.loader import CONFIG_REPOS, TAESD_REPOS, checkpoint_family
from tests.models.helpers import add_to_hf_cache

PROMPT = "a red fox in the snow"


@pytest.fixture(scope="module")
def tiny_xl(tiny_xl_folder):
    return load_components(str(tiny_xl_folder))


def _assert_same_weights(first: torch.nn.Module, second: torch.nn.Module) -> None:
    first_state, second_state = first.state_dict(), second.state_dict()
    assert first_state.keys() == second_state.keys()
    for key in first_state:
        assert torch.equal(first_state[key], second_state[key]), key


def _run(components) -> tuple[torch.Tensor, ...]:
    """Both text encoders on a prompt, and the UNet with SDXL's added conditioning."""
    outputs = []
    for tokenizer, encoder in (
        (components.tokenizer, components.text_encoder),
        (components.tokenizer_2, components.text_encoder_2),
    ):
        ids = tokenizer(
            [PROMPT], padding="max_length", max_length=77, truncation=True, return_tensors="pt"
        ).input_ids
        with torch.no_grad():
            outputs.append(encoder(ids)[0])
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn((1, 4, 8, 8), generator=generator)
    context = torch.randn((1, 77, 80), generator=generator)
    added = {"text_embeds": torch.randn((1, 24), generator=generator)}
    added["time_ids"] = torch.tensor([[64.0, 64.0, 0.0, 0.0, 64.0, 64.0]])
    with torch.no_grad():
        outputs.append(
            components.unet(
                latents, 500, encoder_hidden_states=context, added_cond_kwargs=added
            ).sample
        )
    return tuple(outputs)


def test_an_sdxl_folder_loads_both_text_encoders_and_tokenizers(tiny_xl, tiny_xl_folder):
    assert tiny_xl.family == "sdxl"
    assert isinstance(tiny_xl.text_encoder, CLIPTextModel)
    assert isinstance(tiny_xl.text_encoder_2, CLIPTextModelWithProjection)
    assert tiny_xl.tokenizer_2.model_max_length == 77
    # OpenCLIP pads with "!", CLIP with its end token, as the released tokenizers do.
    assert tiny_xl.tokenizer_2.pad_token == "!" and tiny_xl.tokenizer.pad_token != "!"
    saved = load_file(tiny_xl_folder / "text_encoder_2" / "model.safetensors")
    loaded = tiny_xl.text_encoder_2.state_dict()
    assert all(torch.equal(saved[key], loaded[key]) for key in saved)
    assert tiny_xl.unet.config.addition_embed_type == "text_time"


def _set_zeros_flag(folder, value: bool | None) -> None:
    """Write force_zeros_for_empty_prompt into a folder's model_index.json (None: leave it out)."""
    index_file = folder / "model_index.json"
    index = json.loads(index_file.read_text())
    index.pop("force_zeros_for_empty_prompt")
    if value is not None:
        index["force_zeros_for_empty_prompt"] = value
    index_file.write_text(json.dumps(index))


def test_a_saved_sdxl_folder_says_an_empty_negative_prompt_is_zeros(tiny_xl, tiny_xl_folder):
    index = json.loads((tiny_xl_folder / "model_index.json").read_text())
    assert index["force_zeros_for_empty_prompt"] is True
    assert tiny_xl.force_zeros_for_empty_prompt is True


def test_an_sd_folder_has_no_zeros_for_an_empty_negative_prompt(tiny_folder):
    assert load_components(tiny_folder).force_zeros_for_empty_prompt is False


@pytest.mark.parametrize(("written", "expected"), [(False, False), (None, True)])
def test_an_sdxl_folder_reads_force_zeros_for_empty_prompt_as_diffusers_does(
    tiny_xl_folder, tmp_path, written, expected
):
    copy = shutil.copytree(tiny_xl_folder, tmp_path / "xl")
    _set_zeros_flag(copy, written)
    assert load_components(copy).force_zeros_for_empty_prompt is expected
    # diffusers' own reading of the same folder, a missing flag included.
    pipeline = StableDiffusionXLPipeline.from_pretrained(copy, local_files_only=True)
    assert pipeline.config.force_zeros_for_empty_prompt is expected


def test_both_text_encoders_follow_device_dtype_and_freezing():
    half = load_components("synthetic:tiny-xl", dtype=torch.bfloat16)
    for module in (half.unet, half.vae, half.text_encoder, half.text_encoder_2):
        assert {parameter.dtype for parameter in module.parameters()} == {torch.bfloat16}
        assert not module.training
        assert not any(parameter.requires_grad for parameter in module.parameters())


def test_a_copied_sdxl_folder_loads_like_the_synthetic_name(tiny_xl, tiny_xl_folder, tmp_path):
    copy = shutil.copytree(tiny_xl_folder, tmp_path / "my-xl")
    for expected, actual in zip(_run(tiny_xl), _run(load_components(copy)), strict=True):
        assert torch.equal(expected, actual)


def test_an_sdxl_folder_without_its_second_encoder_names_what_is_missing(tiny_xl_folder, tmp_path):
    copy = shutil.copytree(tiny_xl_folder, tmp_path / "half-xl")
    shutil.rmtree(copy / "text_encoder_2")
    with pytest.raises(FileNotFoundError, match=r"SDXL UNet but no text_encoder_2/"):
        load_components(copy)


def test_vae_tiny_gives_an_sdxl_models_own_taesdxl(tiny_xl_folder):
    components = load_components("synthetic:tiny-xl", vae="tiny")
    assert isinstance(components.vae, AutoencoderTiny)
    saved = load_file(tiny_xl_folder / "taesd" / "diffusion_pytorch_model.safetensors")
    loaded = components.vae.state_dict()
    assert all(torch.equal(saved[key], loaded[key]) for key in saved)


def test_vae_tiny_for_an_sdxl_checkpoint_looks_for_taesdxl(
    tiny_xl_checkpoint, tiny_xl_folder, hf_cache
):
    with pytest.raises(FileNotFoundError) as error:
        load_components(tiny_xl_checkpoint, config=tiny_xl_folder, vae="tiny")
    assert TAESD_REPOS["sdxl"] == "madebyollin/taesdxl"
    assert "hf download madebyollin/taesdxl" in str(error.value)


def test_an_sdxl_checkpoint_with_a_config_folder_matches_the_folder_model(
    tiny_xl, tiny_xl_checkpoint, tiny_xl_folder
):
    assert checkpoint_family(tiny_xl_checkpoint) == "sdxl"
    single = load_components(str(tiny_xl_checkpoint), config=str(tiny_xl_folder))
    assert single.family == "sdxl"
    for part in ("unet", "vae", "text_encoder", "text_encoder_2"):
        _assert_same_weights(getattr(tiny_xl, part), getattr(single, part))
    for expected, actual in zip(_run(tiny_xl), _run(single), strict=True):
        assert torch.allclose(expected, actual, rtol=0, atol=1e-5)
    assert single.vae.config.scaling_factor == tiny_xl.vae.config.scaling_factor
    assert single.force_zeros_for_empty_prompt is True


def test_an_sdxl_checkpoint_takes_force_zeros_for_empty_prompt_from_its_config(
    tiny_xl_checkpoint, tiny_xl_folder, tmp_path
):
    config = shutil.copytree(tiny_xl_folder, tmp_path / "config")
    _set_zeros_flag(config, False)
    single = load_components(str(tiny_xl_checkpoint), config=str(config))
    assert single.force_zeros_for_empty_prompt is False


def test_an_sdxl_checkpoint_takes_its_config_from_the_hub_cache(
    tiny_xl_checkpoint, tiny_xl_folder, hf_cache
):
    add_to_hf_cache(hf_cache, CONFIG_REPOS["sdxl"], tiny_xl_folder)
    single = load_components(str(tiny_xl_checkpoint))
    assert single.family == "sdxl"
    assert single.unet.config.cross_attention_dim == 80
    assert CONFIG_REPOS["sdxl"].replace("/", "--") in single.source
    assert single.force_zeros_for_empty_prompt is True


def test_an_sdxl_checkpoint_without_a_cached_config_says_how_to_fetch_it(
    tiny_xl_checkpoint, hf_cache
):
    with pytest.raises(FileNotFoundError) as error:
        load_components(str(tiny_xl_checkpoint))
    message = str(error.value)
    assert f'hf download {CONFIG_REPOS["sdxl"]} --include "*.json" "*.txt"' in message
    assert "config=" in message and message.count(". ") == 0


def test_a_folder_whose_vae_is_a_tiny_autoencoder_loads_it_as_one(tiny_folder, tmp_path):
    # SDXS ships its tiny autoencoder as the pipeline's vae/.
    copy = shutil.copytree(tiny_folder, tmp_path / "sdxs-like")
    shutil.rmtree(copy / "vae")
    shutil.copytree(copy / "taesd", copy / "vae")
    index = json.loads((copy / "model_index.json").read_text())
    index["vae"] = ["diffusers", "AutoencoderTiny"]
    (copy / "model_index.json").write_text(json.dumps(index))
    components = load_components(copy)
    assert isinstance(components.vae, AutoencoderTiny)
    assert not isinstance(load_components(tiny_folder).vae, AutoencoderTiny)
    assert isinstance(load_components(tiny_folder).vae, AutoencoderKL)


def test_a_v_prediction_scheduler_config_reaches_the_lcm_scheduler(tiny_folder, tmp_path):
    # SD 2.1-768 is told apart by its scheduler, not its UNet.
    copy = shutil.copytree(tiny_folder, tmp_path / "v-pred")
    config_file = copy / "scheduler" / "scheduler_config.json"
    settings = json.loads(config_file.read_text())
    settings["prediction_type"] = "v_prediction"
    config_file.write_text(json.dumps(settings))
    assert load_components(copy).scheduler.config.prediction_type == "v_prediction"
    assert load_components(tiny_folder).scheduler.config.prediction_type == "epsilon"


@pytest.fixture(scope="module")
def tiny_xl_lora(tiny_xl_folder, tmp_path_factory):
    """A rank-4 LoRA of tiny-xl's UNet attention, with random weights, in SDXL's file layout."""
    unet = UNet2DConditionModel.from_pretrained(tiny_xl_folder, subfolder="unet")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        config = LoraConfig(
            r=4,
            lora_alpha=4,
            target_modules=["to_q", "to_k", "to_v", "to_out.0"],
            init_lora_weights=False,
        )
        inject_adapter_in_model(config, unet)
    folder = tmp_path_factory.mktemp("lora-xl")
    StableDiffusionXLPipeline.save_lora_weights(
        folder, unet_lora_layers=get_peft_model_state_dict(unet), weight_name="xl.safetensors"
    )
    return folder / "xl.safetensors"


def test_an_lcm_lora_is_fused_into_an_sdxl_unet(tiny_xl, tiny_xl_lora):
    fused = load_components("synthetic:tiny-xl", lcm_lora=tiny_xl_lora)
    base, changed = tiny_xl.unet.state_dict(), fused.unet.state_dict()
    assert base.keys() == changed.keys()
    moved = [key for key in base if not torch.equal(base[key], changed[key])]
    assert moved and all(".attn" in key for key in moved)
    _assert_same_weights(tiny_xl.text_encoder_2, fused.text_encoder_2)
