"""The family of a model is read from its configuration; other kinds of model are refused."""

from __future__ import annotations

import json
import shutil

import pytest

from bridge.models import load_components
from bridge.models.family import check_unet_config, family_of_config

# The fields that tell the families apart, as the released unet/config.json files have them.
PUBLISHED_UNETS = {
    "stable-diffusion-v1-5/stable-diffusion-v1-5": (
        {"cross_attention_dim": 768, "addition_embed_type": None, "attention_head_dim": 8},
        "sd15",
    ),
    "stabilityai/stable-diffusion-2-1": (
        {
            "cross_attention_dim": 1024,
            "addition_embed_type": None,
            "attention_head_dim": [5, 10, 20, 20],
            "use_linear_projection": True,
        },
        "sd21",
    ),
    "stabilityai/sd-turbo": (
        {"cross_attention_dim": 1024, "addition_embed_type": None, "use_linear_projection": True},
        "sd21",
    ),
    "IDKiro/sdxs-512-0.9": (
        {
            "cross_attention_dim": 1024,
            "addition_embed_type": None,
            "block_out_channels": [320, 640, 1280],
        },
        "sd21",
    ),
    "stabilityai/stable-diffusion-xl-base-1.0": (
        {
            "cross_attention_dim": 2048,
            "addition_embed_type": "text_time",
            "addition_time_embed_dim": 256,
            "projection_class_embeddings_input_dim": 2816,
        },
        "sdxl",
    ),
    "stabilityai/sdxl-turbo": (
        {
            "cross_attention_dim": 2048,
            "addition_embed_type": "text_time",
            "addition_time_embed_dim": 256,
            "projection_class_embeddings_input_dim": 2816,
        },
        "sdxl",
    ),
}


@pytest.mark.parametrize("repo", sorted(PUBLISHED_UNETS))
def test_the_family_follows_the_published_unet_config(repo):
    fields, family = PUBLISHED_UNETS[repo]
    config = {"_class_name": "UNet2DConditionModel", "in_channels": 4, "out_channels": 4, **fields}
    assert family_of_config(config) == family
    assert check_unet_config(config, repo) == family


def test_an_inpainting_unet_is_refused_in_one_sentence():
    config = {"in_channels": 9, "out_channels": 4, "cross_attention_dim": 768}
    with pytest.raises(ValueError, match=r"9 input and 4 output channels \(an inpainting") as error:
        check_unet_config(config, "runwayml/stable-diffusion-inpainting")
    assert str(error.value).count(". ") == 0


def test_an_unknown_added_conditioning_is_refused():
    config = {"in_channels": 4, "out_channels": 4, "addition_embed_type": "image"}
    with pytest.raises(ValueError, match="'image' added conditioning"):
        check_unet_config(config, "kandinsky")


TRANSFORMER_PIPELINES = {
    "sd3": ("StableDiffusion3Pipeline", "SD3Transformer2DModel"),
    "flux": ("FluxPipeline", "FluxTransformer2DModel"),
}


@pytest.mark.parametrize("name", sorted(TRANSFORMER_PIPELINES))
def test_a_transformer_model_folder_is_refused_in_one_sentence(name, tmp_path):
    pipeline, transformer = TRANSFORMER_PIPELINES[name]
    folder = tmp_path / name
    (folder / "transformer").mkdir(parents=True)
    (folder / "transformer" / "config.json").write_text(json.dumps({"_class_name": transformer}))
    index = {"_class_name": pipeline, "transformer": ["diffusers", transformer]}
    (folder / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError) as error:
        load_components(folder)
    message = str(error.value)
    assert f"is a {pipeline} (a transformer model" in message and "not supported" in message
    assert message.count(". ") == 0 and message.endswith(".")


def test_an_inpainting_folder_is_refused_before_its_weights_load(tiny_folder, tmp_path):
    copy = shutil.copytree(tiny_folder, tmp_path / "inpaint")
    config_file = copy / "unet" / "config.json"
    settings = json.loads(config_file.read_text())
    settings["in_channels"] = 9
    config_file.write_text(json.dumps(settings))
    (copy / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(ValueError, match="9 input and 4 output channels"):
        load_components(copy)
