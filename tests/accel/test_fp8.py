"""Float8 UNet products on an FP8 GPU (compute capability 8.9 or newer): accuracy against fp16
under eager PyTorch, a CUDA graph and torch.compile, and the accelerated pipeline.

Accuracy is measured on the SD-Turbo UNet architecture (synthetic:sd-turbo's config) with every
weight random, built here on the GPU, at 512x512. In synthetic:sd-turbo itself the picture passes
through the first level only (bridge/models/passthrough.py): the deeper layers FP8 converts do not
reach its output, which would then compare equal whatever they computed. Each accuracy test also
asserts that the outputs are not identical, so that a conversion that is not used fails.

The bound. e4m3 rounds each operand to 3 mantissa bits, about 2.6% RMS, so one product is off by
about 3.7% RMS: a cosine of about 0.9993 against the exact product. The layers add into residual
streams far larger than that error; on the CPU (fp32 reference, 256x256, these random weights) the
UNet output's cosine was 0.99994 with the 20 layers the default rule converts at batch 1 and
0.99982 with the 65 it converts at batch 4. The bound 0.995 leaves room for fp16 accumulation and
Hopper's fast accumulation, while a wrong scale, a transposed weight or a stale input lands far
below it.
"""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from diffusers import UNet2DConditionModel
from torch import nn

from bridge.accel import accelerate
from bridge.accel.fp8 import (
    Fp8Linear,
    check_kernel,
    convert,
    converted_layers,
    dequantize,
    plan_fp8,
    quantize,
    record_rows,
    shared_copy,
    unet_error,
)
from bridge.models import load_components
from bridge.models.synthetic import SPECS
from bridge.stream import StreamConfig, StreamDiffusion
from tests.accel.helpers import Tapped, apart

COSINE_BOUND = 0.995
# Converted layers of the SD-Turbo UNet at 512x512 under the default rule (test_fp8_math.py).
CONVERTED = {1: 20, 4: 65}


def fp8_gpu() -> bool:
    return torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 9)


pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not fp8_gpu(), reason="needs a GPU of compute capability 8.9 or newer"),
]


@pytest.fixture(scope="module")
def random_turbo() -> UNet2DConditionModel:
    """The SD-Turbo UNet with diffusers' random initialisation, fp16, channels-last, on the GPU."""
    torch.manual_seed(0)
    with torch.device("cuda"):
        unet = UNet2DConditionModel(**SPECS["sd-turbo"].unet)
    return unet.half().eval().to(memory_format=torch.channels_last)


def unet_call(batch: int, seed: int, dtype: torch.dtype = torch.float16) -> tuple[tuple, dict]:
    """Arguments of a 512x512 UNet call: noise latents, a middle timestep, random text tokens."""
    generator = torch.Generator(device="cuda").manual_seed(seed)
    latents = torch.randn(batch, 4, 64, 64, generator=generator, device="cuda").to(dtype)
    context = torch.randn(batch, 77, 1024, generator=generator, device="cuda").to(dtype)
    timesteps = torch.full((batch,), 500, device="cuda")
    return (latents, timesteps), {"encoder_hidden_states": context, "return_dict": False}


def fp8_copy(unet: nn.Module, batch: int, **options) -> nn.Module:
    """A copy of `unet` (sharing its weights) with the default rule's layers in float8."""
    quantized = shared_copy(unet)
    args, kwargs = unet_call(batch, seed=99, dtype=unet.dtype)
    with torch.no_grad():
        rows = record_rows(quantized, lambda: quantized(*args, **kwargs))
    convert(quantized, plan_fp8(quantized, rows).convert, **options)
    return quantized


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return nn.functional.cosine_similarity(a.float().flatten(), b.float().flatten(), dim=0).item()


@pytest.mark.parametrize("per_row", [False, True])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_an_fp8_linear_on_the_gpu_is_the_product_of_its_quantized_operands(dtype, per_row):
    if per_row and dtype == torch.float16:
        try:
            check_kernel(torch.device("cuda"), dtype, "row", torch.cuda.get_device_name())
        except ValueError as refused:
            assert "cannot run row-scaled float8 products with float16 output" in str(refused)
            pytest.skip(str(refused))
    torch.manual_seed(1)
    layer = nn.Linear(1280, 5120, device="cuda", dtype=dtype)
    fp8 = Fp8Linear.from_layer(layer, per_row=per_row)
    x = torch.randn(2, 1024, 1280, device="cuda", dtype=dtype)
    with torch.no_grad():
        out = fp8(x)
        x_q, x_scale = quantize(x.reshape(-1, 1280), per_row)
        w_scale = fp8.weight_scale.reshape(-1, 1) if per_row else fp8.weight_scale
        exact = dequantize(x_q, x_scale) @ dequantize(fp8.weight, w_scale).T + layer.bias.float()
        reference = layer(x)
    assert out.shape == (2, 1024, 5120) and out.dtype == dtype
    # Fast accumulation and the output's rounding are all that separate them.
    torch.testing.assert_close(out.reshape(-1, 5120).float(), exact, rtol=2**-7, atol=5e-3)
    assert 0.998 < cosine(out, reference) < 1.0


@pytest.mark.parametrize("batch", [1, 4])
def test_the_eager_fp8_unet_is_within_the_bound_of_fp16(random_turbo, batch):
    quantized = fp8_copy(random_turbo, batch)
    assert len(converted_layers(quantized)) == CONVERTED[batch]
    assert converted_layers(random_turbo) == []
    error = unet_error(random_turbo, quantized, *unet_call(batch, seed=1))
    assert COSINE_BOUND <= error["cosine"] < 1.0, error
    assert 0 < error["max_abs"] < 0.2 * error["reference_max_abs"], error


def test_a_cuda_graph_of_the_fp8_unet_replays_each_new_input(random_turbo):
    quantized = fp8_copy(random_turbo, 1)
    (first, timesteps), kwargs = unet_call(1, seed=2)
    (second, _), _ = unet_call(1, seed=3)
    static = first.clone()
    with torch.no_grad():
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                quantized(static, timesteps, **kwargs)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_out = quantized(static, timesteps, **kwargs)[0]
        graph.replay()
        out_first = static_out.clone()
        static.copy_(second)
        graph.replay()
        out_second = static_out.clone()
        eager_first = quantized(first, timesteps, **kwargs)[0]
        eager_second = quantized(second, timesteps, **kwargs)[0]
        fp16_second = random_turbo(second, timesteps, **kwargs)[0]
    # Each replay ran eager's kernels on the input of its time: far closer to that than the
    # other input's output is.
    stale_gap = (eager_second - eager_first).abs().max()
    assert (out_first - eager_first).abs().max() <= stale_gap / 20
    assert (out_second - eager_second).abs().max() <= stale_gap / 20
    assert COSINE_BOUND <= cosine(out_second, fp16_second) < 1.0


def test_the_compiled_fp8_unet_is_within_the_bound_of_fp16(random_turbo):
    quantized = fp8_copy(random_turbo, 1)
    compiled = torch.compile(quantized, dynamic=False)
    args, kwargs = unet_call(1, seed=4)
    error = unet_error(random_turbo, compiled, args, kwargs)
    assert COSINE_BOUND <= error["cosine"] < 1.0, error
    # The compiled quantization may round a few values the other way, nothing more.
    with torch.no_grad():
        assert cosine(compiled(*args, **kwargs)[0], quantized(*args, **kwargs)[0]) > 0.9995


def test_bf16_with_a_scale_per_row_is_within_the_bound_of_bf16(random_turbo):
    reference = copy.deepcopy(random_turbo).bfloat16()
    quantized = fp8_copy(reference, 1, per_row=True)
    error = unet_error(reference, quantized, *unet_call(1, seed=5, dtype=torch.bfloat16))
    assert COSINE_BOUND <= error["cosine"] < 1.0, error


@pytest.fixture(scope="module")
def turbo():
    """synthetic:sd-turbo with its tiny VAE, fp16, on the GPU."""
    return load_components("synthetic:sd-turbo", vae="tiny", device="cuda", dtype=torch.float16)


def pictures(count: int) -> list[torch.Tensor]:
    """512x512 pictures: a coloured band moving across a background of another colour."""
    generator = torch.Generator().manual_seed(6)
    result = []
    for index in range(count):
        colours = torch.randint(0, 256, (2, 3), generator=generator, dtype=torch.uint8)
        picture = colours[0].expand(512, 512, 3).clone()
        start = index * 128 % 512
        picture[:, start : start + 256] = colours[1]
        result.append(picture.cuda())
    return result


@pytest.mark.parametrize("accel", ["cudagraph", "compile"])
def test_the_accelerated_fp8_pipeline_follows_its_input_and_the_fp16_pipeline(turbo, accel):
    config = StreamConfig(width=512, height=512, t_index_list=(32,), cfg_type="none")
    fp16 = Tapped(accelerate(StreamDiffusion(turbo, config, prompt="a forest"), accel))
    fp8_components = dataclasses.replace(turbo, unet=shared_copy(turbo.unet))
    stream = StreamDiffusion(fp8_components, config, prompt="a forest")
    fp8 = Tapped(accelerate(stream, accel, precision="fp8"))
    assert len(converted_layers(stream.unet)) == CONVERTED[1]
    assert converted_layers(turbo.unet) == []
    previous = None
    for picture in pictures(4):
        expected, actual = fp16(picture), fp8(picture)
        assert COSINE_BOUND <= cosine(actual[0], expected[0])
        if previous is not None:
            assert apart(actual, previous)  # a new picture, not the captured one
        previous = actual
    assert fp8.accelerator.captures == 1
