"""LoRA files loaded live: unfused adapters whose scale is a tensor that changes in place."""

from __future__ import annotations

import pytest
import torch
from peft.tuners.lora import LoraLayer

from bridge.models import load_components
from bridge.models.live_lora import LiveLoraLayer, load_live_loras
from bridge.models.lora import check_loras
from bridge.runtime.launch import load_model
from bridge.runtime.settings import merge
from tests.models.loras import rewrite, write_lora

# Float error of adding the low-rank update in another order than the fused weight does.
TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def conv_lora(tiny_folder, tmp_path_factory):
    """A second LoRA, of rank 2, on UNet attention and convolutions, without the text encoder."""
    path = tmp_path_factory.mktemp("lora") / "conv.safetensors"
    return write_lora(
        tiny_folder, path, seed=1, rank=2, alpha=1, unet_modules=("to_q", "proj_in", "conv1")
    )


@pytest.fixture(scope="module")
def reference(run_tiny, synthetic_cache):
    return run_tiny(load_components("synthetic:tiny", cache_dir=synthetic_cache))


def live(*loras):
    components = load_components("synthetic:tiny")
    return components, load_live_loras(components, check_loras(loras))


def fused(*loras):
    return load_components("synthetic:tiny", loras=list(loras))


def assert_close(actual, expected) -> None:
    for got, wanted in zip(actual, expected, strict=True):
        assert (got - wanted).abs().max().item() < TOLERANCE


def assert_apart(actual, expected) -> None:
    for got, wanted in zip(actual, expected, strict=True):
        assert (got - wanted).abs().max().item() > 100 * TOLERANCE


@pytest.mark.parametrize("scale", [0.7, -1.3])
def test_unfused_at_a_scale_equals_fused_at_that_scale(tiny_lora, run_tiny, scale):
    components, _ = live((tiny_lora, scale))
    assert_close(run_tiny(components), run_tiny(fused((tiny_lora, scale))))


def test_scale_zero_equals_no_lora(tiny_lora, run_tiny, reference):
    components, _ = live((tiny_lora, 0.0))
    for got, wanted in zip(run_tiny(components), reference, strict=True):
        assert torch.equal(got, wanted)


def test_a_live_scale_change_equals_loading_at_that_scale(tiny_lora, run_tiny):
    components, loras = live((tiny_lora, 1.0))
    before = run_tiny(components)
    loras.set_scale(0, 0.3)
    after = run_tiny(components)
    assert_apart(after, before)
    assert_close(after, run_tiny(live((tiny_lora, 0.3))[0]))
    assert loras.scale(0) == pytest.approx(0.3)


@pytest.mark.slow
def test_two_adapters_have_a_scale_each(tiny_lora, conv_lora, run_tiny):
    components, loras = live((tiny_lora, 1.0), (conv_lora, 0.5))
    assert loras.adapters[0].scale.data_ptr() != loras.adapters[1].scale.data_ptr()
    before = run_tiny(components)
    loras.set_scale(1, -0.5)
    after = run_tiny(components)
    assert_apart(after[1:], before[1:])  # the second LoRA changes the UNet alone
    assert_close(after, run_tiny(fused((tiny_lora, 1.0), (conv_lora, -0.5))))


def test_live_layers_replace_every_peft_layer_and_share_one_scale_per_adapter(tiny_lora, conv_lora):
    components, loras = live((tiny_lora, 1.0), (conv_lora, 0.5))
    networks = (components.unet, components.text_encoder)
    assert not any(isinstance(m, LoraLayer) for n in networks for m in n.modules())
    assert not any(hasattr(network, "peft_config") for network in networks)
    layers = [m for n in networks for m in n.modules() if isinstance(m, LiveLoraLayer)]
    for index, adapter in enumerate(loras.adapters):
        assert sum(index in layer.adapters for layer in layers) == adapter.layers > 0
    # One per-rank vector per layout: rank 4 of the first, rank 2 of the second, or both.
    assert len({layer.rank_scale.data_ptr() for layer in layers}) == 3
    assert loras.adapters[0].networks == ("unet", "text_encoder")
    assert loras.adapters[1].networks == ("unet",)


def test_a_scale_change_asks_for_a_new_prompt_only_where_a_text_encoder_changes(
    tiny_lora, conv_lora
):
    _, loras = live((tiny_lora, 1.0), (conv_lora, 0.5))
    assert loras.set_scale(0, 0.5) is True
    assert loras.set_scale(0, 0.5) is False  # unchanged
    assert loras.set_scale(1, 0.25) is False  # the UNet only


@pytest.mark.parametrize("fuse_loras", [True, False])
def test_the_fuse_loras_setting_leaves_no_lora_layers(tiny_lora, fuse_loras):
    settings = merge({}, {"model": "synthetic:tiny", "fuse_loras": fuse_loras})
    components, loras = load_model(
        settings, [(str(tiny_lora), 0.6)], torch.device("cpu"), torch.float32
    )
    names = [
        name
        for network in (components.unet, components.text_encoder)
        for name, module in network.named_modules()
        if "lora" in name or isinstance(module, (LoraLayer, LiveLoraLayer))
    ]
    assert (names == [] and loras is None) if fuse_loras else (names and len(loras) == 1)


def _rank_doubled(key, tensor):
    return key, torch.cat([tensor, tensor]) if key.endswith("lora_A.weight") else tensor


def _width_doubled(key, tensor):
    return key, torch.cat([tensor, tensor], dim=-1) if key.endswith("lora_A.weight") else tensor


def _renamed(key, tensor):
    return key.replace("transformer_blocks", "other_blocks"), tensor


def _partly_renamed(key, tensor):
    return _renamed(key, tensor) if key.startswith("unet.down_blocks") else (key, tensor)


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        (_rank_doubled, "layer shapes"),
        (_width_doubled, "layer shapes"),
        (_renamed, "layers this model does not have"),
        (_partly_renamed, "layers this model does not have"),
    ],
    ids=["rank-layout", "another-width", "no-key-matches", "some-keys-match-nothing"],
)
@pytest.mark.parametrize("fuse", [False, True], ids=["live", "fused"])
def test_a_lora_that_does_not_fit_is_one_sentence_naming_the_file(
    tiny_lora, tmp_path, change, reason, fuse
):
    bad = rewrite(tiny_lora, tmp_path / "misfit.safetensors", change)
    with pytest.raises(ValueError, match=reason) as refused:
        if fuse:
            fused((bad, 1.0))
        else:
            live((bad, 1.0))
    sentence = str(refused.value)
    assert sentence.startswith("LoRA file misfit.safetensors does not fit this SD 1.x model")
    assert sentence.endswith("pass a LoRA made for SD 1.x models.")
    assert "\n" not in sentence


def test_a_file_without_lora_weights_is_named(tmp_path, tiny_lora):
    bad = rewrite(
        tiny_lora, tmp_path / "plain.safetensors", lambda k, t: (k.replace("lora", "w"), t)
    )
    with pytest.raises(ValueError, match="plain.safetensors .*holds no LoRA weights"):
        live((bad, 1.0))


def test_a_non_finite_live_scale_is_refused(tiny_lora):
    _, loras = live((tiny_lora, 1.0))
    with pytest.raises(ValueError, match="finite"):
        loras.set_scale(0, float("nan"))
    assert loras.scale(0) == 1.0
    with pytest.raises(IndexError, match="index from 0 to 0"):
        loras.set_scale(1, 0.5)


def test_an_sdxl_lora_changes_both_text_encoders_live_as_fusing_does(tmp_path):
    from bridge.models.synthetic_lora import write_synthetic_lora
    from bridge.stream import StreamDiffusion

    components = load_components("synthetic:tiny-xl")
    lora = write_synthetic_lora(components, tmp_path / "xl.safetensors", seed=0, rank=4)
    loras = load_live_loras(components, check_loras([(lora, 1.0)]))
    assert loras.adapters[0].networks == ("unet", "text_encoder", "text_encoder_2")
    stream = StreamDiffusion(components, prompt="a fox")
    at_one = stream.encode_prompt("a fox").clone()
    assert loras.set_scale(0, -1.0)
    stream.prompts.forget()
    fused_stream = StreamDiffusion(load_components("synthetic:tiny-xl", loras=[(lora, -1.0)]))
    expected = fused_stream.encode_prompt("a fox")
    assert (expected - at_one).abs().max().item() > 1e-2
    assert (stream.encode_prompt("a fox") - expected).abs().max().item() < TOLERANCE
