"""Single-file checkpoints in the original (LDM) layout, converted through diffusers."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from bridge.models import load_components
from bridge.models.loader import CONFIG_REPOS, checkpoint_family
from tests.models.helpers import add_to_hf_cache, write_ldm_checkpoint


def _assert_same_weights(first: torch.nn.Module, second: torch.nn.Module) -> None:
    first_state, second_state = first.state_dict(), second.state_dict()
    assert first_state.keys() == second_state.keys()
    for key in first_state:
        assert torch.equal(first_state[key], second_state[key]), key


def test_checkpoint_with_a_config_folder_matches_the_folder_model(
    tiny_checkpoint, tiny_folder, run_tiny
):
    folder_model = load_components(str(tiny_folder))
    single = load_components(str(tiny_checkpoint), config=str(tiny_folder))

    for part in ("unet", "vae", "text_encoder"):
        _assert_same_weights(getattr(folder_model, part), getattr(single, part))
    # Equal weights; the last float bits may differ with the kernels picked for each copy.
    for expected, actual in zip(run_tiny(folder_model), run_tiny(single), strict=True):
        assert torch.allclose(expected, actual, rtol=0, atol=1e-5)
    assert single.family == "sd15"
    assert str(tiny_checkpoint) in single.source


def test_a_ckpt_file_loads_like_a_safetensors_file(tiny_folder, tmp_path):
    ckpt = write_ldm_checkpoint(tiny_folder, tmp_path / "tiny.ckpt")
    single = load_components(str(ckpt), config="synthetic:tiny")
    _assert_same_weights(load_components(str(tiny_folder)).unet, single.unet)


def test_without_config_the_familys_repo_is_read_from_the_hub_cache(
    tiny_checkpoint, tiny_folder, hf_cache
):
    add_to_hf_cache(hf_cache, CONFIG_REPOS["sd15"], tiny_folder)
    single = load_components(str(tiny_checkpoint))
    assert single.unet.config.cross_attention_dim == 32
    assert CONFIG_REPOS["sd15"].replace("/", "--") in single.source


def test_without_config_or_cached_repo_the_error_says_how_to_fetch_it(tiny_checkpoint, hf_cache):
    with pytest.raises(FileNotFoundError) as error:
        load_components(str(tiny_checkpoint))
    message = str(error.value)
    assert f'hf download {CONFIG_REPOS["sd15"]} --include "*.json" "*.txt"' in message
    assert str(hf_cache) in message
    assert "config=" in message


def test_family_is_read_from_the_text_encoder_layout(tmp_path):
    layouts = {
        "cond_stage_model.transformer.text_model.final_layer_norm.weight": "sd15",
        "cond_stage_model.model.ln_final.weight": "sd21",
        "conditioner.embedders.1.model.ln_final.weight": "sdxl",
    }
    for key, family in layouts.items():
        path = tmp_path / f"{family}.safetensors"
        save_file({key: torch.zeros(1)}, path)
        assert checkpoint_family(path) == family


def test_a_checkpoint_without_a_known_text_encoder_asks_for_config(tmp_path):
    path = tmp_path / "unet-only.safetensors"
    save_file({"model.diffusion_model.out.2.bias": torch.zeros(4)}, path)
    with pytest.raises(ValueError, match="config="):
        load_components(str(path))
