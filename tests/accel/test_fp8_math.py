"""Float8 UNet products on the CPU: the quantization maths, which layers are chosen, the swap, and
the refusals.

torch runs `torch._scaled_mm` on the CPU too, so `Fp8Linear` runs here as it does on a GPU (the
GPU side is tests/accel/test_fp8.py). e4m3 has 3 mantissa bits: a value in its normal range
(2^-6 and up) rounds to within 2^-4 of itself, a smaller one to within 2^-10 (half the subnormal
step). Those two bounds are what the quantization tests hold the error to.
"""

from __future__ import annotations

import dataclasses
import functools

import pytest
import torch
from diffusers import UNet2DConditionModel
from torch import nn

from bridge.accel import accelerate
from bridge.accel import fp8 as fp8_module
from bridge.accel.fp8 import (
    E4M3_MAX,
    EVERY_LAYER,
    FLOAT8,
    MIN_SCALE,
    Fp8Linear,
    Fp8Rule,
    check_fp8,
    check_kernel,
    convert,
    converted_layers,
    dequantize,
    plan_fp8,
    quantize,
    quantize_unet,
    record_rows,
    shared_copy,
    unet_error,
    unet_inputs,
)
from bridge.models import load_components
from bridge.models.synthetic import SPECS
from bridge.stream import StreamConfig, StreamDiffusion

HALVES = (torch.float16, torch.bfloat16)


def rounding_bound(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The most e4m3 rounding may move each value of `x` quantized with `scale`, plus the fp16
    or bf16 rounding of x / scale on the way (at most 2^-8 of it)."""
    scaled = x.float().abs() / scale
    return (2**-4 * scaled * (1 + 2**-8) + 2**-10) * scale


@pytest.mark.parametrize("dtype", HALVES)
def test_per_tensor_quantization_puts_the_largest_value_at_448_and_rounds_within_e4m3s_step(
    dtype,
) -> None:
    generator = torch.Generator().manual_seed(0)
    # Six decades of magnitude, so that the small values land in e4m3's subnormal range.
    x = (torch.randn(64, 48, generator=generator) * 10 ** torch.linspace(-3, 3, 48)).to(dtype)
    q, scale = quantize(x)
    assert q.dtype == FLOAT8 and scale.dtype == torch.float32 and scale.shape == ()
    assert scale.item() == pytest.approx(x.float().abs().max().item() / E4M3_MAX, rel=1e-6)
    assert q.float().abs().max().item() == E4M3_MAX
    error = (dequantize(q, scale) - x.float()).abs()
    assert (error <= rounding_bound(x, scale)).all()
    # Not the identity: e4m3 really rounds, by up to its half step.
    assert (error / x.float().abs().clamp(min=1e-3)).max() > 2**-6


@pytest.mark.parametrize("dtype", HALVES)
def test_per_row_quantization_gives_each_row_its_own_scale(dtype) -> None:
    generator = torch.Generator().manual_seed(1)
    magnitudes = 10 ** torch.linspace(-2, 3, 16).unsqueeze(1)
    x = (torch.randn(16, 64, generator=generator) * magnitudes).to(dtype)
    q, scale = quantize(x, per_row=True)
    assert scale.shape == (16, 1)
    assert (q.float().abs().amax(dim=1) == E4M3_MAX).all()
    error = (dequantize(q, scale) - x.float()).abs()
    assert (error <= rounding_bound(x, scale)).all()
    # The smallest row, quantized with the tensor's one scale, falls into e4m3's subnormals and
    # loses most of its precision: what a scale per row is for.
    q_tensor, scale_tensor = quantize(x)
    small_row = x[0].float()
    relative = (dequantize(q_tensor[0], scale_tensor) - small_row).norm() / small_row.norm()
    relative_row = (dequantize(q[0], scale[0]) - small_row).norm() / small_row.norm()
    assert relative > 0.1 > 0.05 > relative_row


@pytest.mark.parametrize("dtype", HALVES)
def test_no_input_overflows_e4m3_whatever_its_largest_value(dtype) -> None:
    """x / scale depends on the mantissa of the largest value, not on its exponent, so every
    mantissa of one binade and one value of every binade cover every finite input."""
    info = torch.finfo(dtype)
    mantissa_bits = {torch.float16: 10, torch.bfloat16: 7}[dtype]
    one_binade = 1 + torch.arange(2**mantissa_bits) / 2**mantissa_bits
    # From the smallest subnormal to the largest power of two.
    exponents = {torch.float16: (-24, 15), torch.bfloat16: (-133, 127)}[dtype]
    every_binade = 2.0 ** torch.arange(exponents[0], exponents[1] + 1)
    tops = torch.cat([one_binade, every_binade, torch.tensor([info.max])]).to(dtype)
    assert (tops > 0).all() and tops.isfinite().all()
    for top in tops:
        x = torch.stack([top, -top, top / 3]).view(1, 3)
        for per_row in (False, True):
            q, scale = quantize(x, per_row)
            # What the cast receives must stay below 464, where e4m3 would round to 480 (NaN
            # unless the cast saturates, as the CPU's does).
            assert (x / scale).float().abs().max() < 464, f"{top.item()} overflows"
            values = q.float()
            assert not values.isnan().any() and values.abs().max() <= E4M3_MAX
            if top.item() >= E4M3_MAX * MIN_SCALE:
                assert values[0, 0] == E4M3_MAX


def test_zeros_quantize_to_zeros_and_a_layer_then_gives_its_bias() -> None:
    q, scale = quantize(torch.zeros(8, 32, dtype=torch.float16))
    assert (q.float() == 0).all() and scale.item() == MIN_SCALE
    layer = nn.Linear(32, 16).half()
    out = Fp8Linear.from_layer(layer)(torch.zeros(3, 32, dtype=torch.float16))
    assert torch.equal(out, layer.bias.detach().expand(3, 16))


@pytest.mark.parametrize("per_row", [False, True])
@pytest.mark.parametrize("dtype", HALVES)
def test_an_fp8_linear_is_the_exact_product_of_its_quantized_operands_plus_the_bias(
    dtype, per_row
) -> None:
    torch.manual_seed(2)
    layer = nn.Linear(64, 48).to(dtype)
    fp8 = Fp8Linear.from_layer(layer, per_row=per_row)
    x = torch.randn(2, 10, 64, dtype=dtype)
    out = fp8(x)
    assert out.shape == (2, 10, 48) and out.dtype == dtype
    x_q, x_scale = quantize(x.reshape(20, 64), per_row)
    w_scale = fp8.weight_scale.reshape(-1, 1) if per_row else fp8.weight_scale
    weight = dequantize(fp8.weight, w_scale)
    exact = dequantize(x_q, x_scale).double() @ weight.double().T + layer.bias.double()
    # Only the output's own rounding separates them (bf16: 2^-8 of the value).
    tolerance = 2**-7 if dtype == torch.bfloat16 else 2**-10
    torch.testing.assert_close(out.reshape(20, 48).double(), exact, rtol=tolerance, atol=1e-3)
    # And that product is the layer's own, to float8's few percent.
    reference = layer(x).float().flatten()
    cosine = nn.functional.cosine_similarity(out.float().flatten(), reference, dim=0)
    assert 0.998 < cosine < 1.0


def test_a_1x1_convolution_is_the_linear_layer_over_channels_in_either_memory_layout() -> None:
    torch.manual_seed(3)
    conv = nn.Conv2d(64, 32, 1).half()
    linear = nn.Linear(64, 32).half()
    linear.weight.data.copy_(conv.weight.data.view(32, 64))
    linear.bias.data.copy_(conv.bias.data)
    x = torch.randn(2, 64, 5, 7, dtype=torch.float16)
    as_linear = Fp8Linear.from_layer(linear)(x.permute(0, 2, 3, 1))
    fp8_conv = Fp8Linear.from_layer(conv)
    for layout in (torch.contiguous_format, torch.channels_last):
        out = fp8_conv(x.contiguous(memory_format=layout))
        assert out.shape == (2, 32, 5, 7)
        assert out.is_contiguous(memory_format=torch.channels_last)
        assert torch.equal(out.permute(0, 2, 3, 1), as_linear)


def test_layers_that_do_not_fit_scaled_mm_are_counted_and_kept() -> None:
    model = nn.Sequential(
        nn.Linear(64, 64),
        nn.Linear(64, 40),  # 40 outputs: not a multiple of 16
        nn.Linear(40, 64),
        nn.Conv2d(64, 64, 3, padding=1),  # not a linear layer over channels
        nn.Conv2d(64, 64, 1, stride=2),  # skips pixels: neither
        nn.Conv2d(64, 32, 1),
    )

    def run() -> None:
        flat = model[2](model[1](model[0](torch.randn(3, 64))))
        model[5](model[4](model[3](flat.view(3, 64, 1, 1).expand(3, 64, 4, 4))))

    rows = record_rows(model, run)
    assert rows == {"0": 3, "1": 3, "2": 3, "5": 12}
    plan = plan_fp8(model, rows, EVERY_LAYER)
    assert plan.convert == ["0", "5"] and plan.misaligned == ["1", "2"] and plan.candidates == 4
    assert convert(model, plan.convert) == 2
    assert converted_layers(model) == ["0", "5"]
    assert [type(layer) for layer in model[1:5]] == [nn.Linear, nn.Linear, nn.Conv2d, nn.Conv2d]
    with pytest.raises(ValueError, match="both sizes must be multiples of 16"):
        Fp8Linear.from_layer(nn.Linear(64, 40))


@functools.cache
def meta_rows(model: str, batch: int) -> tuple[UNet2DConditionModel, dict[str, int]]:
    """A synthetic model's UNet on the meta device (shapes only), and its rows per call at
    512x512 and `batch`."""
    with torch.device("meta"):
        unet = UNet2DConditionModel(**SPECS[model].unet).half()
    width = unet.config.cross_attention_dim
    latents = torch.zeros(batch, 4, 64, 64, device="meta", dtype=torch.float16)
    context = torch.zeros(batch, 77, width, device="meta", dtype=torch.float16)
    timesteps = torch.zeros(batch, device="meta", dtype=torch.long)
    return unet, record_rows(unet, lambda: unet(latents, timesteps, encoder_hidden_states=context))


def meta_plan(model: str, batch: int, rule: Fp8Rule | None = None):
    """What `rule` does with a synthetic model's UNet at 512x512 and `batch`."""
    return plan_fp8(*meta_rows(model, batch), rule)


def test_the_default_rule_on_sd_turbo_takes_the_feed_forward_layers_and_at_batch_4_more() -> None:
    one, four = meta_plan("sd-turbo", 1), meta_plan("sd-turbo", 4)
    block = "down_blocks.0.attentions.0.transformer_blocks.0"
    assert one.shapes[f"{block}.ff.net.0.proj"].rows == 4096
    assert four.shapes[f"{block}.attn2.to_k"].rows == 4 * 77
    assert four.shapes["time_embedding.linear_1"].rows == 4
    assert one.candidates == four.candidates == 230 and not one.misaligned
    # Batch 1: the feed-forward layers of all 16 transformer blocks but the middle one (64
    # tokens) widen to 2560 outputs and more; only the 1280-wide level's narrow back.
    assert one.by_group() == {"feed-forward": 20}
    # Batch 4: the 1280-wide level's attention, projections and shortcuts pass 2 GFLOP too.
    assert four.by_group() == {
        "attention": 30,
        "feed-forward": 22,
        "proj_in/out": 10,
        "conv shortcut": 3,
    }
    assert not any("time_emb" in name or "attn2.to_k" in name for name in four.convert)
    assert four.converted_gflop() > 5 * one.converted_gflop() > 500


def test_sd15_proj_in_and_out_are_1x1_convolutions_the_rule_takes_like_linear_ones() -> None:
    plan = meta_plan("sd15", 4)
    assert plan.by_group()["proj_in/out"] == 10
    assert "down_blocks.2.attentions.0.proj_in" in plan.convert
    assert meta_plan("tiny", 4).convert == []  # the tiny model's layers are all too small
    assert len(meta_plan("tiny", 4, EVERY_LAYER).convert) == 63


def test_a_group_rule_converts_only_that_group() -> None:
    rule = Fp8Rule(min_out_features=0, min_gflop=0.0, groups=frozenset({"time embedding"}))
    plan = meta_plan("sd-turbo", 1, rule)
    assert len(plan.convert) == 24 and plan.by_group() == {"time embedding": 24}


def random_tiny_unet(dtype: torch.dtype) -> UNet2DConditionModel:
    """synthetic:tiny's architecture with every weight random: every layer reaches the output."""
    torch.manual_seed(4)
    return UNet2DConditionModel(**SPECS["tiny"].unet).to(dtype).eval()


def test_every_layer_in_fp8_keeps_the_unet_output_close_and_the_original_untouched() -> None:
    dtype = torch.bfloat16  # the CPU's fp16 kernels are slow, and the maths is the same
    unet = random_tiny_unet(dtype)
    before = {key: value.clone() for key, value in unet.state_dict().items()}
    generator = torch.Generator().manual_seed(5)
    args = (torch.randn(1, 4, 8, 8, generator=generator).to(dtype), torch.tensor([500]))
    kwargs = {"encoder_hidden_states": torch.randn(1, 77, 32, generator=generator).to(dtype)}
    quantized = shared_copy(unet)
    with torch.no_grad():
        rows = record_rows(quantized, lambda: quantized(*args, **kwargs))
    assert convert(quantized, plan_fp8(quantized, rows, EVERY_LAYER).convert) == 63
    error = unet_error(unet, quantized, args, {**kwargs, "return_dict": False})
    # 3.7% RMS per product through a few products in series (module notes): above 0.995.
    assert 0.995 < error["cosine"] < 1.0
    assert 0 < error["max_abs"] < 0.1 * error["reference_max_abs"]
    # The copy shared the weights; quantizing them left them as they were.
    assert converted_layers(unet) == []
    assert all(torch.equal(value, before[key]) for key, value in unet.state_dict().items())


@pytest.fixture(scope="module")
def tiny_bf16(tmp_path_factory):
    return load_components(
        "synthetic:tiny",
        vae="tiny",
        device="cpu",
        dtype=torch.bfloat16,
        cache_dir=tmp_path_factory.mktemp("synthetic"),
    )


def test_the_stream_unet_is_converted_at_the_rows_of_the_streams_batch(
    tiny_bf16, monkeypatch
) -> None:
    # The CPU stands in for an FP8 GPU: _scaled_mm runs here.
    monkeypatch.setattr(fp8_module, "check_fp8", lambda *args: None)
    config = StreamConfig(width=64, height=64, t_index_list=(20, 35), cfg_type="self")
    unet = shared_copy(tiny_bf16.unet)
    stream = StreamDiffusion(dataclasses.replace(tiny_bf16, unet=unet), config, prompt="a forest")
    args, kwargs = unet_inputs(stream)
    with torch.inference_mode():
        plan = quantize_unet(stream, EVERY_LAYER)
        error = unet_error(tiny_bf16.unet, stream.unet, args, kwargs)
    # Two denoising steps a call, 8x8 latents: 2 x 64 rows at the first level, 2 x 77 tokens.
    block = "down_blocks.0.attentions.0.transformer_blocks.0"
    assert plan.shapes[f"{block}.attn1.to_q"].rows == 2 * 64
    assert plan.shapes[f"{block}.attn2.to_k"].rows == 2 * 77
    assert converted_layers(stream.unet) == plan.convert and len(plan.convert) == 63
    assert 0.99 < error["cosine"] < 1.0


def test_fp8_is_refused_on_the_cpu_naming_the_device_and_the_fix() -> None:
    with pytest.raises(ValueError) as refused:
        check_fp8(torch.device("cpu"), torch.float16)
    assert str(refused.value) == (
        'precision="fp8" needs an NVIDIA GPU of compute capability 8.9 or newer (Ada, Hopper, '
        'Blackwell), but the pipeline runs on cpu; use precision="default".'
    )


def stand_in_gpu(monkeypatch, capability: tuple[int, int], name: str) -> None:
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)


def test_fp8_is_refused_on_a_gpu_older_than_ada_naming_it_and_its_capability(monkeypatch) -> None:
    stand_in_gpu(monkeypatch, (8, 6), "NVIDIA GeForce RTX 3090")
    with pytest.raises(ValueError) as refused:
        check_fp8(torch.device("cuda"), torch.float16)
    assert str(refused.value) == (
        'precision="fp8" needs a GPU of compute capability 8.9 or newer (Ada, Hopper, '
        'Blackwell); the NVIDIA GeForce RTX 3090 has 8.6; use precision="default".'
    )


def test_fp8_is_refused_for_an_fp32_model_even_on_hopper(monkeypatch) -> None:
    stand_in_gpu(monkeypatch, (9, 0), "NVIDIA H200")
    with pytest.raises(ValueError) as refused:
        check_fp8(torch.device("cuda"), torch.float32)
    assert str(refused.value) == (
        'precision="fp8" runs on an fp16 or bf16 model, but this one is float32; use '
        'dtype="fp16" with it, or precision="default".'
    )


def test_a_float8_product_torch_cannot_run_is_refused_in_one_sentence(monkeypatch) -> None:
    def unsupported(*args, **kwargs):
        raise RuntimeError(
            "Only bf16 high precision output types are supported for row-wise scaling.\nmore"
        )

    monkeypatch.setattr(torch, "_scaled_mm", unsupported)
    with pytest.raises(ValueError) as refused:
        check_kernel(torch.device("cpu"), torch.float16, "row", "NVIDIA L40S")
    assert str(refused.value) == (
        f"torch {torch.__version__} cannot run row-scaled float8 products with float16 output "
        "on the NVIDIA L40S (Only bf16 high precision output types are supported for row-wise "
        'scaling.); use precision="default".'
    )


def test_accelerate_refuses_fp8_on_the_cpu_and_leaves_the_unet_alone(tiny_bf16) -> None:
    config = StreamConfig(width=64, height=64, t_index_list=(32,), cfg_type="none")
    stream = StreamDiffusion(tiny_bf16, config, prompt="a forest")
    with pytest.raises(ValueError, match=r'runs on cpu; use precision="default"\.$'):
        accelerate(stream, "none", precision="fp8")
    assert converted_layers(stream.unet) == []
    with pytest.raises(ValueError, match="precision 'fp4' is unknown; use one of default, fp8"):
        accelerate(stream, "none", precision="fp4")
