"""FP8 matrix products for the UNet's large linear layers, on GPUs that have them (8.9 and up).

Ada (compute capability 8.9) and Hopper (9.0) tensor cores multiply float8 matrices at twice the
rate of fp16 ones. A chosen `nn.Linear`, or a 1x1 `nn.Conv2d` (a linear layer over channels),
becomes an `Fp8Linear`. Its weight W is quantized once to float8 e4m3 (4 exponent bits, 3
mantissa bits, largest finite value 448) with the scale s_w = amax|W| / 448, one for the whole
tensor or one per output row. Each call quantizes its input x the same way, from the input's own
amax, computed on the GPU (no host synchronisation, so a CUDA graph captures it and
torch.compile traces it), and `torch._scaled_mm` multiplies the two float8 matrices, accumulates
in fp32, multiplies by the scales, adds the bias and writes the model's dtype:

    y = s_x s_w (q(x / s_x) q(W / s_w)^T) + b

Error. Rounding to 3 mantissa bits changes each value by at most 2^-4 of itself (half a unit in
the last place), about 2.6% RMS; a dot product of such values, both operands rounded, is off by
about 3.7% RMS of its size. The error of one layer is small beside the residual stream it is
added to, and the bench and the GPU tests measure the UNet's output against fp16.

Which layers pay. Quantizing the input is an extra pass over it: read it for its amax, read it
again and write one byte per value, about 4 bytes of traffic per input value beyond what fp16
reads. FP8 saves about half the fp16 product's time, M K N / P16 for an (M x K) input and an
(N x K) weight at fp16 rate P16. The saving beats the pass when N > 4 P16 / bandwidth, about 800
on an H100 or H200 (990 TFLOP/s, 3.4 to 4.8 TB/s): only wide outputs pay, and only large
products pay at all, since a small one is a fraction of a wave of tiles whose time is mostly
launch and latency. `Fp8Rule` says both: at least `min_out_features` outputs, and at least
`min_gflop` per call, counted from the rows M a call really has (`record_rows` runs the UNet once
at the stream's shapes and notes them). `torch._scaled_mm` also needs both dimensions of the
weight to be multiples of 16; a layer that is not stays as it is and is counted apart.

Per-row scaling (one scale per output row of W and per row of x) is more accurate, but torch
runs it with CUTLASS, which writes bf16 only, on 8.9 and with a cuBLAS older than 12.9, and with
cuBLAS, which writes fp16 too, on 9.0 and up with cuBLAS 12.9 or newer. Per-tensor scaling works
on every FP8 GPU for fp16 and bf16 models, so it is the default; `check_fp8` runs one small
product of the chosen kind on the device first, so an unsupported combination is refused in a
sentence instead of failing inside a frame.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from bridge.stream import StreamDiffusion

FLOAT8 = torch.float8_e4m3fn
E4M3_MAX = 448.0
MIN_CAPABILITY = (8, 9)
SCALINGS = ("tensor", "row")
# `torch._scaled_mm` wants every dimension of the weight to be a multiple of this.
ALIGNMENT = 16
# The smallest scale: an all-zero input then quantizes to zeros rather than 0/0, and the scale
# stays a normal fp16 number, so dividing an fp16 input by it is exact to fp16 rounding.
MIN_SCALE = 2.0**-14
# A timestep in the middle of training's range, for the sample UNet calls.
SAMPLE_TIMESTEP = 500


def quantize(x: torch.Tensor, per_row: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """`x` (rows, features) as float8 e4m3 and the float32 scale that multiplies it back.

    The scale is amax|x| / 448, one for the tensor (shape ()) or one per row (rows, 1), never
    below `MIN_SCALE`. Nothing needs clamping: x / scale is at most 448 plus fp16 or bf16
    rounding (below 452), which e4m3 rounds to 448, its largest value. From 464 on a value would
    round to 480, which e4m3fn does not have: a cast that does not saturate makes it NaN.
    """
    if per_row:
        amax = torch.linalg.vector_norm(x, math.inf, dim=-1, keepdim=True, dtype=torch.float32)
    else:
        amax = torch.linalg.vector_norm(x, math.inf, dtype=torch.float32)
    scale = amax.div(E4M3_MAX).clamp_(min=MIN_SCALE)
    return (x / scale).to(FLOAT8), scale


def dequantize(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The float32 values a float8 tensor and its scale stand for."""
    return q.float() * scale


def is_candidate(layer: nn.Module) -> bool:
    """Whether `layer` is a linear layer over its last dimension or over channels (1x1 conv)."""
    if isinstance(layer, nn.Linear):
        return True
    return (
        isinstance(layer, nn.Conv2d)
        and layer.kernel_size == (1, 1)
        and layer.stride == (1, 1)
        and layer.dilation == (1, 1)
        and layer.groups == 1
        and layer.padding in ((0, 0), "valid")
    )


def _features(layer: nn.Module) -> tuple[int, int]:
    if isinstance(layer, nn.Linear):
        return layer.in_features, layer.out_features
    return layer.in_channels, layer.out_channels


class Fp8Linear(nn.Module):
    """A linear layer (or 1x1 convolution) whose product runs in float8 (see the module notes).

    The weight is kept as float8 with its scale; the input is quantized on every call. Inputs of
    any number of leading dimensions are flattened to rows; a 1x1 convolution's (B, C, H, W)
    input becomes (B H W, C) rows (a free view when it is channels-last) and its output comes
    back as (B, N, H, W) in the channels-last layout.
    """

    def __init__(
        self,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        *,
        per_row: bool = False,
        conv: bool = False,
        fast_accum: bool = True,
    ) -> None:
        super().__init__()
        out_features, in_features = weight.shape[:2]
        if in_features % ALIGNMENT or out_features % ALIGNMENT:
            raise ValueError(
                f"a {in_features} -> {out_features} layer does not fit float8 products: both "
                f"sizes must be multiples of {ALIGNMENT}."
            )
        with torch.no_grad():
            q, scale = quantize(weight.detach().reshape(out_features, in_features).float(), per_row)
        self.in_features = in_features
        self.out_features = out_features
        self.per_row = per_row
        self.conv = conv
        # Hopper's faster accumulation: inference only, and its error is below float8's.
        self.fast_accum = fast_accum
        self.out_dtype = weight.dtype
        self.register_buffer("weight", q)
        self.register_buffer("weight_scale", scale.reshape(1, -1) if per_row else scale)
        self.register_buffer("bias", None if bias is None else bias.detach().to(weight.dtype))

    @classmethod
    def from_layer(
        cls, layer: nn.Module, *, per_row: bool = False, fast_accum: bool = True
    ) -> Fp8Linear:
        """The float8 version of an `nn.Linear` or a 1x1 `nn.Conv2d`."""
        if not is_candidate(layer):
            raise ValueError(
                f"{type(layer).__name__} is not a linear layer or a 1x1 convolution; only those "
                "have float8 versions."
            )
        return cls(
            layer.weight,
            layer.bias,
            per_row=per_row,
            conv=isinstance(layer, nn.Conv2d),
            fast_accum=fast_accum,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.conv:
            batch, _, height, width = x.shape
            rows = x.permute(0, 2, 3, 1).reshape(-1, self.in_features)
        else:
            rows = x.reshape(-1, self.in_features)
        # `_scaled_mm` reads its first operand row-major; the quantized copy keeps its layout.
        x_q, x_scale = quantize(rows.contiguous(), self.per_row)
        out = torch._scaled_mm(
            x_q,
            self.weight.t(),  # column-major, as `_scaled_mm` wants its second operand
            scale_a=x_scale,
            scale_b=self.weight_scale,
            bias=self.bias,
            out_dtype=self.out_dtype,
            use_fast_accum=self.fast_accum,
        )
        if self.conv:
            return out.view(batch, height, width, self.out_features).permute(0, 3, 1, 2)
        return out.view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        scaling = "row" if self.per_row else "tensor"
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"scaling={scaling}, conv={self.conv}, bias={self.bias is not None}"
        )


# --------------------------------------------------------------------------- which layers


GROUPS = ("attention", "feed-forward", "proj_in/out", "time embedding", "conv shortcut", "other")


def layer_group(name: str) -> str:
    """The kind of UNet layer a module name belongs to, one of `GROUPS`."""
    parts = name.split(".")
    if "attn1" in parts or "attn2" in parts:
        return "attention"
    if "ff" in parts:
        return "feed-forward"
    if "proj_in" in parts or "proj_out" in parts:
        return "proj_in/out"
    if {"time_embedding", "time_emb_proj", "add_embedding"} & set(parts):
        return "time embedding"
    if "conv_shortcut" in parts:
        return "conv shortcut"
    return "other"


@dataclass(frozen=True)
class LayerShape:
    """One linear layer as a call sees it: rows M per call, inputs K, outputs N."""

    rows: int
    in_features: int
    out_features: int

    @property
    def gflop(self) -> float:
        """Work of one call."""
        return 2 * self.rows * self.in_features * self.out_features / 1e9


@dataclass(frozen=True)
class Fp8Rule:
    """Which layers become float8: wide enough outputs, and enough work per call.

    The defaults follow the module notes: N >= 1024 outputs, and 2 M K N >= 2 GFLOP a call,
    2 microseconds at an H200's fp16 peak, a few times the cost of the quantization's extra
    kernels in a CUDA graph. `groups` keeps only layers of the named `GROUPS` (None: all).
    """

    min_out_features: int = 1024
    min_gflop: float = 2.0
    groups: frozenset[str] | None = None

    def keeps(self, name: str, shape: LayerShape) -> bool:
        """Whether the rule converts this layer (already known to be aligned)."""
        if self.groups is not None and layer_group(name) not in self.groups:
            return False
        return shape.out_features >= self.min_out_features and shape.gflop >= self.min_gflop


EVERY_LAYER = Fp8Rule(min_out_features=0, min_gflop=0.0)
"""Convert every aligned layer that runs."""


@dataclass
class Fp8Plan:
    """Which linear layers of a model a rule converts, and why the others stay.

    `misaligned` layers have a size that is not a multiple of 16 (`torch._scaled_mm` refuses
    them), `small` ones fall under the rule, `unused` ones did not run in the recorded call.
    """

    shapes: dict[str, LayerShape]
    convert: list[str] = field(default_factory=list)
    misaligned: list[str] = field(default_factory=list)
    small: list[str] = field(default_factory=list)
    unused: list[str] = field(default_factory=list)

    @property
    def candidates(self) -> int:
        """Linear layers and 1x1 convolutions in the model."""
        return len(self.convert) + len(self.misaligned) + len(self.small) + len(self.unused)

    def converted_gflop(self) -> float:
        """Work per UNet call that runs in float8."""
        return sum(self.shapes[name].gflop for name in self.convert)

    def by_group(self) -> dict[str, int]:
        """Converted layers per group."""
        counts = dict.fromkeys(GROUPS, 0)
        for name in self.convert:
            counts[layer_group(name)] += 1
        return {group: count for group, count in counts.items() if count}

    def line(self) -> str:
        """One line for the start-up log."""
        return (
            f"fp8: {len(self.convert)} of {self.candidates} linear layers run in float8 "
            f"({self.converted_gflop():.0f} GFLOP a UNet call); {len(self.small)} below the size "
            f"rule, {len(self.misaligned)} with a size not a multiple of {ALIGNMENT}, "
            f"{len(self.unused)} unused"
        )

    def summary(self) -> dict[str, Any]:
        """The plan as JSON-ready values, for benchmark reports."""
        return {
            "converted": len(self.convert),
            "candidates": self.candidates,
            "small": len(self.small),
            "misaligned": len(self.misaligned),
            "unused": len(self.unused),
            "converted_gflop": round(self.converted_gflop(), 2),
            "by_group": self.by_group(),
            "layers": list(self.convert),
        }


def record_rows(model: nn.Module, run: Callable[[], object]) -> dict[str, int]:
    """Rows per call (tokens x batch, or pixels x batch) of every candidate layer `run` calls.

    A layer called more than once keeps its largest count.
    """
    rows: dict[str, int] = {}
    handles = []

    def note(name: str, in_features: int) -> Callable[..., None]:
        def hook(_module: nn.Module, args: tuple) -> None:
            rows[name] = max(rows.get(name, 0), args[0].numel() // in_features)

        return hook

    for name, layer in model.named_modules():
        if is_candidate(layer):
            handles.append(layer.register_forward_pre_hook(note(name, _features(layer)[0])))
    try:
        run()
    finally:
        for handle in handles:
            handle.remove()
    return rows


def plan_fp8(model: nn.Module, rows: Mapping[str, int], rule: Fp8Rule | None = None) -> Fp8Plan:
    """Sort every candidate layer of `model` by what `rule` (default `Fp8Rule()`) does with it."""
    rule = rule or Fp8Rule()
    plan = Fp8Plan(shapes={})
    for name, layer in model.named_modules():
        if not is_candidate(layer):
            continue
        in_features, out_features = _features(layer)
        if name not in rows:
            plan.unused.append(name)
            continue
        shape = plan.shapes[name] = LayerShape(rows[name], in_features, out_features)
        if in_features % ALIGNMENT or out_features % ALIGNMENT:
            plan.misaligned.append(name)
        elif rule.keeps(name, shape):
            plan.convert.append(name)
        else:
            plan.small.append(name)
    return plan


def convert(
    model: nn.Module, names: list[str], *, per_row: bool = False, fast_accum: bool = True
) -> int:
    """Replace the named layers of `model` by `Fp8Linear`s in place; return how many."""
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        layer = parent.get_submodule(child)
        setattr(parent, child, Fp8Linear.from_layer(layer, per_row=per_row, fast_accum=fast_accum))
    return len(names)


def converted_layers(model: nn.Module) -> list[str]:
    """Names of the `Fp8Linear` layers in `model` (a compiled model's names as its original's)."""
    return [
        name.removeprefix("_orig_mod.")
        for name, layer in model.named_modules()
        if isinstance(layer, Fp8Linear)
    ]


def shared_copy(model: nn.Module) -> nn.Module:
    """A copy of `model`'s modules that shares every parameter and buffer with it.

    Converting the copy leaves `model` as it was, at the memory cost of the float8 weights only.
    """
    memo: dict[int, Any] = {id(tensor): tensor for tensor in model.parameters()}
    memo.update({id(tensor): tensor for tensor in model.buffers()})
    return copy.deepcopy(model, memo)


# --------------------------------------------------------------------------- the stream's UNet


def check_fp8(device: torch.device, dtype: torch.dtype, scaling: str = "tensor") -> None:
    """Refuse, in one sentence naming the GPU and the fix, what cannot run float8 products.

    Checks the device (an NVIDIA GPU of compute capability 8.9 or newer), the model's dtype
    (fp16 or bf16), then runs one small product of the chosen `scaling` on the device.
    """
    if scaling not in SCALINGS:
        raise ValueError(f"fp8 scaling {scaling!r} is unknown; use one of {', '.join(SCALINGS)}.")
    fix = 'use precision="default"'
    wanted = "compute capability 8.9 or newer (Ada, Hopper, Blackwell)"
    if device.type != "cuda" or torch.version.hip is not None:
        where = "an AMD GPU" if device.type == "cuda" else str(device)
        raise ValueError(
            f'precision="fp8" needs an NVIDIA GPU of {wanted}, but the pipeline runs on '
            f"{where}; {fix}."
        )
    capability = torch.cuda.get_device_capability(device)
    name = torch.cuda.get_device_name(device)
    if capability < MIN_CAPABILITY:
        raise ValueError(
            f'precision="fp8" needs a GPU of {wanted}; the {name} has {capability[0]}.'
            f"{capability[1]}; {fix}."
        )
    if dtype not in (torch.float16, torch.bfloat16):
        raise ValueError(
            f'precision="fp8" runs on an fp16 or bf16 model, but this one is '
            f'{str(dtype).removeprefix("torch.")}; use dtype="fp16" with it, or '
            'precision="default".'
        )
    check_kernel(device, dtype, scaling, name)


def check_kernel(device: torch.device, dtype: torch.dtype, scaling: str, gpu: str) -> None:
    """Run one small float8 product of this kind on `device`; refuse in a sentence if torch
    cannot (e.g. per-row scaling with fp16 output where only CUTLASS's bf16 kernel exists)."""
    try:
        sample = nn.Linear(ALIGNMENT, ALIGNMENT, device=device, dtype=dtype)
        Fp8Linear.from_layer(sample, per_row=scaling == "row")(
            torch.ones((ALIGNMENT, ALIGNMENT), device=device, dtype=dtype)
        )
    except RuntimeError as error:
        lines = str(error).strip().splitlines()
        raise ValueError(
            f"torch {torch.__version__} cannot run {scaling}-scaled float8 products with "
            f"{str(dtype).removeprefix('torch.')} output on the {gpu} "
            f'({lines[0] if lines else type(error).__name__}); use precision="default".'
        ) from None


def unet_inputs(stream: StreamDiffusion, seed: int = 0) -> tuple[tuple, dict[str, Any]]:
    """Arguments of one UNet call at the stream's shapes: seeded noise latents at a middle
    timestep, conditioned on the current prompt (and SDXL's size ids)."""
    batch = stream.unet_batch_size
    config = stream.config
    generator = torch.Generator(device=stream.device).manual_seed(seed)
    shape = (batch, stream.unet.config.in_channels, *config.latent_size)
    latents = torch.randn(shape, generator=generator, device=stream.device, dtype=stream.dtype)
    timesteps = torch.full((batch,), SAMPLE_TIMESTEP, device=stream.device, dtype=torch.long)
    context = stream.current_embedding().expand(batch, -1, -1)
    if stream.conditioning is None:
        kwargs: dict[str, Any] = {"encoder_hidden_states": context}
    else:
        kwargs = stream.conditioning.unet_kwargs(context)
    return (latents, timesteps), {**kwargs, "return_dict": False}


def quantize_unet(
    stream: StreamDiffusion,
    rule: Fp8Rule | None = None,
    *,
    scaling: str = "tensor",
    fast_accum: bool = True,
) -> Fp8Plan:
    """Turn the large linear layers of the stream's UNet into `Fp8Linear`s, in place.

    Refuses (ValueError) what `check_fp8` refuses. The UNet runs once at the stream's shapes so
    that `rule` (default `Fp8Rule()`) sees each layer's real rows per call.
    """
    check_fp8(stream.device, stream.dtype, scaling)
    args, kwargs = unet_inputs(stream)
    with torch.no_grad():
        rows = record_rows(stream.unet, lambda: stream.unet(*args, **kwargs))
    plan = plan_fp8(stream.unet, rows, rule)
    convert(stream.unet, plan.convert, per_row=scaling == "row", fast_accum=fast_accum)
    return plan


@torch.no_grad()
def unet_error(
    reference: nn.Module, quantized: nn.Module, args: tuple, kwargs: Mapping[str, Any]
) -> dict[str, float]:
    """How far `quantized`'s output is from `reference`'s on the same call.

    Returns the cosine similarity of the two outputs (flattened, in float32), the largest
    absolute difference, and the largest absolute value of the reference for scale.
    """
    expected = _output(reference(*args, **kwargs)).float().flatten()
    actual = _output(quantized(*args, **kwargs)).float().flatten()
    cosine = torch.nn.functional.cosine_similarity(expected, actual, dim=0)
    return {
        "cosine": cosine.item(),
        "max_abs": (expected - actual).abs().max().item(),
        "reference_max_abs": expected.abs().max().item(),
    }


def _output(result: object) -> torch.Tensor:
    """The first output of a diffusers model called with return_dict=False, or the tensor."""
    return result[0] if isinstance(result, tuple) else result
