"""LoRA files fused into the UNet and the text encoder at their scale."""

from __future__ import annotations

import pytest
import torch

from bridge.models import load_components


@pytest.fixture(scope="module")
def reference(run_tiny, synthetic_cache):
    return run_tiny(load_components("synthetic:tiny", cache_dir=synthetic_cache))


def test_scale_zero_leaves_outputs_unchanged(tiny_lora, run_tiny, reference):
    embedding, noise = run_tiny(load_components("synthetic:tiny", loras=[(tiny_lora, 0.0)]))
    assert torch.allclose(embedding, reference[0])
    assert torch.allclose(noise, reference[1])


def test_scale_one_changes_the_unet_and_the_text_encoder(tiny_lora, run_tiny, reference):
    embedding, noise = run_tiny(load_components("synthetic:tiny", loras=[(tiny_lora, 1.0)]))
    assert not torch.allclose(embedding, reference[0])
    assert not torch.allclose(noise, reference[1])


def test_fused_lora_leaves_no_adapter_layers(tiny_lora):
    components = load_components("synthetic:tiny", loras=[(str(tiny_lora), 1.0)])
    names = [name for name, _ in components.unet.named_modules()]
    names += [name for name, _ in components.text_encoder.named_modules()]
    assert not any("lora" in name for name in names)
    assert not any(p.requires_grad for p in components.unet.parameters())


def test_scale_scales_the_update(tiny_lora):
    # The fused update is linear in the scale, so half the scale moves a weight half as far.
    def weight(scale: float) -> torch.Tensor:
        components = load_components("synthetic:tiny", loras=[(tiny_lora, scale)])
        return components.unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_q.weight

    base = weight(0.0)
    assert torch.allclose(weight(0.5) - base, (weight(1.0) - base) / 2, atol=1e-6)


def test_lcm_lora_is_fused_at_scale_one(tiny_lora, run_tiny):
    with_lcm = run_tiny(load_components("synthetic:tiny", lcm_lora=tiny_lora))
    at_one = run_tiny(load_components("synthetic:tiny", loras=[(tiny_lora, 1.0)]))
    for expected, actual in zip(at_one, with_lcm, strict=True):
        assert torch.equal(expected, actual)


def test_a_missing_lora_file_is_named_before_anything_loads(tmp_path):
    missing = tmp_path / "style.safetensors"
    with pytest.raises(FileNotFoundError, match="style.safetensors"):
        load_components("synthetic:does-not-matter", loras=[(missing, 0.8)])


def test_a_missing_lcm_lora_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="lcm.safetensors"):
        load_components("synthetic:tiny", lcm_lora=tmp_path / "lcm.safetensors")


@pytest.mark.parametrize("scale", [float("nan"), "0.8", True])
def test_a_scale_that_is_not_a_finite_number_is_refused(tiny_lora, scale):
    with pytest.raises(ValueError, match="scale"):
        load_components("synthetic:tiny", loras=[(tiny_lora, scale)])
