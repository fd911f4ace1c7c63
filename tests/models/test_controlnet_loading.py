"""ControlNets load from a synthetic name, a folder, one file or the Hugging Face cache, offline,
and one made for another family is refused with one sentence."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from diffusers import ControlNetModel, UNet2DConditionModel
from safetensors.torch import save_file

from bridge.models.controlnet import controlnet_config_for, load_controlnet
from bridge.models.synthetic import SPECS
from bridge.models.synthetic_controlnet import CONTROLNET_BASES, ensure_synthetic_controlnet
from tests.models.helpers import add_to_hf_cache

TINY = "synthetic:controlnet-tiny"


@pytest.fixture(scope="module")
def tiny_unet_config(tiny_folder):
    return UNet2DConditionModel.from_pretrained(tiny_folder, subfolder="unet").config


@pytest.fixture(scope="module")
def tiny_controlnet_folder(synthetic_cache):
    return ensure_synthetic_controlnet(TINY, synthetic_cache / "synthetic")


def plain(value: object) -> object:
    """A configuration value with tuples as lists, as a config.json gives them back."""
    return list(value) if isinstance(value, tuple) else value


def same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    left, right = a.state_dict(), b.state_dict()
    return left.keys() == right.keys() and all(torch.equal(left[k], right[k]) for k in left)


def test_a_synthetic_controlnet_is_diffusers_own_controlnet_of_its_unet(
    tiny_unet_config, tiny_controlnet_folder
):
    loaded = load_controlnet(TINY, tiny_unet_config)
    assert isinstance(loaded, ControlNetModel) and not loaded.training
    expected = ControlNetModel.from_unet(UNet2DConditionModel(**SPECS["tiny"].unet))
    for key in ("block_out_channels", "cross_attention_dim", "down_block_types"):
        assert plain(loaded.config[key]) == plain(expected.config[key])
    # Its zero convolutions are awake: residuals are not zero.
    assert loaded.controlnet_mid_block.weight.abs().sum() > 0
    assert same_weights(loaded, ControlNetModel.from_pretrained(tiny_controlnet_folder))


def test_the_real_shaped_controlnets_match_their_models_architecture():
    for name, base in CONTROLNET_BASES.items():
        with torch.device("meta"):
            unet = UNet2DConditionModel(**SPECS[base].unet)
        config = controlnet_config_for(unet.config)
        assert plain(config["block_out_channels"]) == plain(unet.config.block_out_channels), name
        assert config["cross_attention_dim"] == unet.config.cross_attention_dim, name
    with torch.device("meta"):
        unet = UNet2DConditionModel(**SPECS["sd-turbo"].unet)
        controlnet = ControlNetModel(**controlnet_config_for(unet.config))
    # The size of published SD 2.1 ControlNets in diffusers layout.
    assert sum(p.numel() for p in controlnet.parameters()) == 364_228_240


def test_a_folder_and_the_hf_cache_load_the_same_controlnet_offline(
    tiny_unet_config, tiny_controlnet_folder, hf_cache, tmp_path
):
    pipeline_folder = tmp_path / "pipeline"
    shutil.copytree(tiny_controlnet_folder, pipeline_folder / "controlnet")
    add_to_hf_cache(hf_cache, "someone/controlnet-tiny", tiny_controlnet_folder)
    reference = load_controlnet(tiny_controlnet_folder, tiny_unet_config)
    for name in ("someone/controlnet-tiny", str(pipeline_folder)):
        assert same_weights(load_controlnet(name, tiny_unet_config), reference)
    with pytest.raises(FileNotFoundError, match="never downloaded unless asked"):
        load_controlnet("someone/missing-controlnet", tiny_unet_config)


def test_a_single_file_loads_with_the_config_beside_it_or_the_unets(
    tiny_unet_config, tiny_controlnet_folder, tmp_path
):
    reference = load_controlnet(tiny_controlnet_folder, tiny_unet_config)
    alone = tmp_path / "alone" / "canny.safetensors"
    alone.parent.mkdir()
    save_file(reference.state_dict(), str(alone))
    beside = tmp_path / "beside" / "canny.safetensors"
    shutil.copytree(tiny_controlnet_folder, beside.parent)
    shutil.move(beside.parent / "diffusion_pytorch_model.safetensors", beside)
    for path in (alone, beside):
        assert same_weights(load_controlnet(path, tiny_unet_config), reference)


def test_a_controlnet_of_another_family_is_one_sentence_naming_both_and_the_fix(
    tiny_unet_config, tiny_folder, tmp_path
):
    with pytest.raises(ValueError) as refused:
        load_controlnet("synthetic:controlnet-tiny-xl", tiny_unet_config)
    assert str(refused.value) == (
        "ControlNet 'synthetic:controlnet-tiny-xl' is made for SDXL models, but the model is "
        "SD 1.x; pick a ControlNet trained for SD 1.x, such as lllyasviel/control_v11p_sd15_canny."
    )
    sd21 = {**tiny_unet_config, "cross_attention_dim": 1024}
    with pytest.raises(ValueError, match="is made for SD 1.x models, but the model is SD 2.x"):
        load_controlnet(TINY, sd21)


def test_what_is_no_controlnet_is_refused_with_one_sentence(
    tiny_unet_config, tiny_folder, tmp_path
):
    with pytest.raises(ValueError, match="no synthetic ControlNet; choose one of synthetic:cont"):
        load_controlnet("synthetic:tiny", tiny_unet_config)
    with pytest.raises(FileNotFoundError, match="has no config.json .*pass a ControlNet folder"):
        load_controlnet(tiny_folder, tiny_unet_config)
    with pytest.raises(FileNotFoundError, match="No ControlNet at 'nowhere.safetensors'"):
        load_controlnet("nowhere.safetensors", tiny_unet_config)
    other = tmp_path / "other"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"_class_name": "ControlNetXSAdapter"}))
    with pytest.raises(ValueError, match="is a ControlNetXSAdapter; only diffusers' ControlNetM"):
        load_controlnet(other, tiny_unet_config)
    wrong = tmp_path / "wrong.safetensors"
    save_file({"something.weight": torch.zeros(2)}, str(wrong))
    with pytest.raises(ValueError, match="does not fit a ControlNet of this model's architecture"):
        load_controlnet(wrong, tiny_unet_config)
