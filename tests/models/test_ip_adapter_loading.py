"""IP-Adapter files in h94/IP-Adapter's layout, read through diffusers into the UNet; the synthetic
ones have the published architecture; files that cannot work are refused in one sentence."""

from __future__ import annotations

import pytest
import torch
from diffusers.models.attention_processor import IPAdapterAttnProcessor2_0
from safetensors.torch import save_file
from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

from bridge.models import load_components
from bridge.models.ip_adapter import load_ip_adapter, read_ip_adapter_file, resolve_ip_adapter
from bridge.models.synthetic import SPECS
from bridge.models.synthetic_ip_adapter import (
    CLIP_VIT_H_VISION,
    IP_ADAPTER_SPECS,
    TINY_VISION,
    cross_attention_layers,
)

CROSS_ATTENTION = "down_blocks.0.attentions.0.transformer_blocks.0.attn2.processor"


@pytest.fixture
def tiny():
    return load_components("synthetic:tiny", vae="tiny")


@pytest.fixture
def weights():
    return resolve_ip_adapter("synthetic:tiny")


def test_the_published_layout_is_read_into_every_cross_attention_layer(tiny, weights):
    assert weights.name == "ip-adapter_tiny.safetensors"
    assert (weights.parent / "image_encoder" / "config.json").is_file()
    file = read_ip_adapter_file(weights)
    assert sorted(file["image_proj"]) == ["norm.bias", "norm.weight", "proj.bias", "proj.weight"]
    assert sorted(file["ip_adapter"]) == [
        f"{key_id}.{name}.weight" for key_id in (1, 3, 5, 7) for name in ("to_k_ip", "to_v_ip")
    ]
    adapter = load_ip_adapter(tiny, weights)
    processors = tiny.unet.attn_processors
    loaded = [p for p in processors.values() if isinstance(p, IPAdapterAttnProcessor2_0)]
    assert len(loaded) == 4 == sum(name.endswith("attn2.processor") for name in processors)
    first = processors[CROSS_ATTENTION]
    assert torch.equal(first.to_k_ip[0].weight, file["ip_adapter"]["1.to_k_ip.weight"])
    assert torch.equal(
        adapter.image_projection.image_embeds.weight, file["image_proj"]["proj.weight"]
    )
    # The UNet is called as before: the projection is kept beside it, not on it.
    assert tiny.unet.encoder_hid_proj is None and tiny.unet.config.encoder_hid_dim_type is None
    assert adapter.image_tokens(torch.zeros((40, 30, 3), dtype=torch.uint8)).shape == (1, 4, 32)


def test_a_bin_file_in_the_original_nested_layout_reads_as_the_safetensors_one(tmp_path, weights):
    file = read_ip_adapter_file(weights)
    nested = tmp_path / "ip-adapter_tiny.bin"
    torch.save(file, nested)
    again = read_ip_adapter_file(nested)
    for part in ("image_proj", "ip_adapter"):
        assert again[part].keys() == file[part].keys()
        assert all(torch.equal(again[part][key], file[part][key]) for key in file[part])


def test_the_sd_turbo_adapter_is_ip_adapter_sd15s_architecture_with_1024_wide_tokens():
    layers = cross_attention_layers(SPECS["sd-turbo"].unet)
    assert [key_id for key_id, _ in layers] == list(range(1, 32, 2))
    widths = [320] * 2 + [640] * 2 + [1280] * 5 + [640] * 3 + [320] * 3 + [1280]
    assert [width for _, width in layers] == widths
    assert layers == cross_attention_layers(SPECS["sd15"].unet)
    assert SPECS["sd-turbo"].unet["cross_attention_dim"] == 1024
    assert IP_ADAPTER_SPECS["sd-turbo"].image_encoder is CLIP_VIT_H_VISION
    with torch.device("meta"):
        encoder = CLIPVisionModelWithProjection(CLIPVisionConfig(**CLIP_VIT_H_VISION))
    assert sum(p.numel() for p in encoder.parameters()) == 632_076_800


def write(path, tensors) -> str:
    save_file(tensors, str(path))
    return str(path)


@pytest.mark.parametrize(
    ("tensors", "sentence"),
    [
        (
            {"unet.conv_in.lora_A.weight": torch.zeros(2, 2)},
            "holds no image_proj and ip_adapter weights, so it is not an IP-Adapter file",
        ),
        (
            {"image_proj.latents": torch.zeros(1, 16, 8),
             "ip_adapter.1.to_k_ip.weight": torch.zeros(2, 2)},
            "is an IP-Adapter Plus, Full-face or FaceID file",
        ),
    ],
)  # fmt: skip
def test_a_file_that_is_no_base_ip_adapter_is_refused_with_one_sentence(
    tiny, tmp_path, tensors, sentence
):
    with pytest.raises(ValueError, match=sentence) as refused:
        load_ip_adapter(tiny, write(tmp_path / "adapter.safetensors", tensors))
    assert str(refused.value).count(". ") == 0


def test_a_file_that_does_not_read_or_does_not_exist_is_one_sentence(tiny, tmp_path):
    broken = tmp_path / "broken.safetensors"
    broken.write_text("not weights")
    with pytest.raises(ValueError, match="broken.safetensors could not be read"):
        load_ip_adapter(tiny, broken)
    with pytest.raises(FileNotFoundError, match="IP-Adapter file 'missing.bin' does not exist"):
        load_ip_adapter(tiny, "missing.bin")


def test_an_image_encoder_of_another_width_is_refused_naming_the_setting(tiny, tmp_path, weights):
    other = CLIPVisionModelWithProjection(CLIPVisionConfig(**{**TINY_VISION, "projection_dim": 8}))
    other.save_pretrained(tmp_path / "encoder")
    with pytest.raises(ValueError, match="gives 8-wide embeddings but IP-Adapter") as refused:
        load_ip_adapter(tiny, weights, tmp_path / "encoder")
    assert "ip_adapter_image_encoder=FOLDER" in str(refused.value)
    with pytest.raises(FileNotFoundError, match="is not a CLIP image encoder folder"):
        load_ip_adapter(tiny, weights, tmp_path)
