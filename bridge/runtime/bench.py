"""`sd-bridge bench`: our pipeline against the original StreamDiffusion, same models, same run.

Each case names an architecture, a mode and the stream settings. For every case the baseline
runs first, then our pipeline once per acceleration mode, all on the very same model objects.
The baseline is the original (PyPI `streamdiffusion`, its `StreamDiffusion` class) when it is
installed; it has no SDXL, so SDXL cases measure diffusers' own `StableDiffusionXLImg2ImgPipeline`
instead (one denoising step, the same weights and size). Frames stay on the GPU for all (a float
tensor in for the baselines, which their APIs want; uint8 in and out for ours), and every frame
is waited for, as a live stream must: the timings are per-frame latencies, and fps is frames over
wall-clock time. Each run also reports its peak GPU memory.

Each of our runs can also use float8 UNet products (`precision` "fp8", see bridge/accel/fp8.py),
beside the default precision in the same run. An fp8 run converts a copy of the UNet that shares
the unconverted weights, so the other runs keep the model as loaded, and records which layers it
converted and how far its UNet output is from the default UNet's on the same input.

A compile run can compile each network whole (`compile_scope` "model") or its repeated blocks
(`compile_scope` "blocks", see bridge/accel/regions.py), or each in turn in the same run;
`setup_s` then says what each costs to start.
"""

from __future__ import annotations

import dataclasses
import gc
import itertools
import json
import platform
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import date
from pathlib import Path

import torch

from bridge.accel import COMPILE_SCOPES, PRECISIONS, accelerate, set_compile_stance
from bridge.accel.fp8 import converted_layers, layer_group, shared_copy, unet_error, unet_inputs
from bridge.models import load_components
from bridge.stream import ControlNet, PromptEncoder, StreamConfig, StreamDiffusion
from bridge.stream.canny import canny
from bridge.stream.frames import mark_uploaded

PROMPT = "a portrait of an astronaut, oil painting, dramatic light"


@dataclass(frozen=True)
class Case:
    """One benchmark configuration."""

    name: str
    model: str
    mode: str
    t_index_list: tuple[int, ...]
    cfg_type: str
    width: int = 512
    height: int = 512
    frame_buffer_size: int = 1
    # "original" StreamDiffusion, "diffusers-xl" (StableDiffusionXLImg2ImgPipeline) for SDXL, or
    # "none" where the cases compare among themselves (live LoRAs against fused ones).
    baseline: str = "original"
    # Random rank-16 LoRAs of the attention layers: live (scales that change) or fused.
    loras: int = 0
    fuse_loras: bool = False
    # The synthetic IP-Adapter of the model, following a random picture at scale 0.6.
    ip_adapter: bool = False
    # One synthetic ControlNet of the model's architecture (CONTROLNETS) per entry, each named
    # by where its control image comes from: "canny" (made on the GPU) or "passthrough".
    controlnets: tuple[str, ...] = ()
    # Time the canny preprocessor alone on frames of the case's size: no model runs.
    preprocessor: bool = False
    # The similarity filter on, fed two alternating random pictures so that it skips nothing:
    # what deciding costs a frame.
    similarity_filter: bool = False

    def config(self) -> StreamConfig:
        return StreamConfig(
            width=self.width,
            height=self.height,
            t_index_list=self.t_index_list,
            cfg_type=self.cfg_type,
            mode=self.mode,
            frame_buffer_size=self.frame_buffer_size,
            similarity_filter=self.similarity_filter,
        )


# The synthetic ControlNet made for each synthetic model.
CONTROLNETS = {
    "synthetic:sd-turbo": "synthetic:controlnet-sd-turbo",
    "synthetic:sd15": "synthetic:controlnet-sd15",
    "synthetic:tiny": "synthetic:controlnet-tiny",
}


def _one_step(name: str, model: str, **settings) -> Case:
    """A 1-step img2img case (`t_index_list` [32], no guidance), the shape most cases take."""
    return Case(name, model, "img2img", (32,), "none", **settings)


_TURBO = "synthetic:sd-turbo"
_TINY = {"model": "synthetic:tiny", "width": 64, "height": 64}

GPU_CASES = {
    "turbo-img2img": _one_step("sd-turbo img2img 1 step", _TURBO),
    "turbo-img2img-fbs4": _one_step(
        "sd-turbo img2img 1 step, frame_buffer_size 4", _TURBO, frame_buffer_size=4
    ),
    "turbo-txt2img": Case("sd-turbo txt2img 1 step", _TURBO, "txt2img", (0,), "none"),
    "sd15-img2img-rcfg": Case(
        "sd15 img2img [32, 45] RCFG self", "synthetic:sd15", "img2img", (32, 45), "self"
    ),
    "sd15-txt2img-4step": Case(
        "sd15 txt2img [0, 16, 32, 45]", "synthetic:sd15", "txt2img", (0, 16, 32, 45), "none"
    ),
    "turbo-img2img-768x432": _one_step(
        "sd-turbo img2img 1 step 768x432", _TURBO, width=768, height=432
    ),
    "turbo-img2img-1024x576": _one_step(
        "sd-turbo img2img 1 step 1024x576", _TURBO, width=1024, height=576
    ),
    "sdxl-turbo-img2img": _one_step(
        "sdxl-turbo img2img 1 step", "synthetic:sdxl-turbo", baseline="diffusers-xl"
    ),
    "sdxl-turbo-img2img-1024": _one_step(
        "sdxl-turbo img2img 1 step 1024x1024",
        "synthetic:sdxl-turbo",
        width=1024,
        height=1024,
        baseline="diffusers-xl",
    ),
    "sdxs-img2img": _one_step("sdxs img2img 1 step", "synthetic:sdxs"),
    "sdxs-img2img-fbs2": _one_step(
        "sdxs img2img 1 step, frame_buffer_size 2", "synthetic:sdxs", frame_buffer_size=2
    ),
    "sdxs-img2img-fbs4": _one_step(
        "sdxs img2img 1 step, frame_buffer_size 4", "synthetic:sdxs", frame_buffer_size=4
    ),
    "turbo-img2img-filter": _one_step(
        "sd-turbo img2img 1 step, similarity filter on, nothing skipped",
        _TURBO,
        baseline="none",
        similarity_filter=True,
    ),
    "turbo-img2img-2lora-live": _one_step(
        "sd-turbo img2img 1 step, 2 live LoRAs", _TURBO, baseline="none", loras=2
    ),
    "turbo-img2img-2lora-fused": _one_step(
        "sd-turbo img2img 1 step, 2 fused LoRAs",
        _TURBO,
        baseline="none",
        loras=2,
        fuse_loras=True,
    ),
    "turbo-img2img-ipadapter": _one_step(
        "sd-turbo img2img 1 step, IP-Adapter", _TURBO, baseline="none", ip_adapter=True
    ),
    "turbo-img2img-controlnet": _one_step(
        "sd-turbo img2img 1 step, 1 ControlNet (canny)",
        _TURBO,
        baseline="none",
        controlnets=("canny",),
    ),
    "turbo-img2img-2controlnet": _one_step(
        "sd-turbo img2img 1 step, 2 ControlNets (canny, passthrough)",
        _TURBO,
        baseline="none",
        controlnets=("canny", "passthrough"),
    ),
    "canny-512": _one_step("canny preprocessor 512x512", "", baseline="none", preprocessor=True),
}
CPU_CASES = {
    "tiny-img2img": Case(
        "tiny img2img [32, 45] RCFG self", "synthetic:tiny", "img2img", (32, 45), "self", 64, 64
    ),
    "tiny-txt2img": Case("tiny txt2img 1 step", "synthetic:tiny", "txt2img", (0,), "none", 64, 64),
}
# The SDXL, ControlNet, IP-Adapter and filter paths at CPU size, for a smoke run of what their
# GPU cases do.
CPU_SMOKE_CASES = {
    "tiny-img2img-filter": _one_step(
        "tiny img2img 1 step, similarity filter on, nothing skipped",
        **_TINY,
        baseline="none",
        similarity_filter=True,
    ),
    "tiny-img2img-controlnet": _one_step(
        "tiny img2img 1 step, 1 ControlNet (canny)",
        **_TINY,
        baseline="none",
        controlnets=("canny",),
    ),
    "canny-64": _one_step(
        "canny preprocessor 64x64", "", width=64, height=64, baseline="none", preprocessor=True
    ),
    "tinyxl-img2img": _one_step(
        "tiny-xl img2img 1 step",
        "synthetic:tiny-xl",
        width=64,
        height=64,
        baseline="diffusers-xl",
    ),
    "tiny-img2img-ipadapter": _one_step(
        "tiny img2img 1 step, IP-Adapter", **_TINY, baseline="none", ip_adapter=True
    ),
}


@dataclass
class Result:
    """What one implementation did on one case."""

    case: str
    implementation: str
    accel: str
    frames: int
    fps: float
    p50_ms: float
    p99_ms: float
    latency_ms: float
    setup_s: float
    error: str = ""
    extra: dict = field(default_factory=dict)
    # The most GPU memory the run held at once (torch's allocator), 0 on the CPU.
    peak_memory_mb: float = 0.0
    # Precision of our UNet's products: "default" (the dtype) or "fp8".
    precision: str = "default"
    # What a compile run compiled: "model" (each network whole) or "blocks".
    compile_scope: str = "model"

    @property
    def label(self) -> str:
        """The acceleration as the table shows it, with a precision and compile scope other than
        the defaults."""
        words = [self.accel]
        if self.compile_scope != "model":
            words.append(self.compile_scope)
        if self.precision != "default":
            words.append(self.precision)
        return " ".join(words)


def device_name(device: torch.device) -> str:
    """The GPU's name, or the CPU's when there is no GPU."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()})"


def _time_frames(
    step: Callable[[], object], frames: int, warmup: int, device: torch.device
) -> list[float]:
    def wait() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for _ in range(warmup):
        step()
    wait()
    times = []
    for _ in range(frames):
        start = time.perf_counter()
        step()
        wait()
        times.append(time.perf_counter() - start)
    return times


def _pipelined_fps(step: Callable[[], object], calls: int, device: torch.device) -> float:
    """Calls a second with no wait between them, only after the last."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(calls):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return calls / (time.perf_counter() - start)


def _result(
    case: Case, implementation: str, accel: str, times: list[float], setup: float
) -> Result:
    per_call = statistics.median(times)
    frames_per_call = case.frame_buffer_size
    ordered = sorted(times)
    p99 = ordered[min(len(ordered) - 1, int(round(0.99 * (len(ordered) - 1))))]
    # A frame entering the stream leaves it k - 1 calls later, at the end of a call.
    latency = (len(case.t_index_list) - 1) * per_call + per_call
    return Result(
        case=case.name,
        implementation=implementation,
        accel=accel,
        frames=len(times) * frames_per_call,
        fps=len(times) * frames_per_call / sum(times),
        p50_ms=per_call * 1000,
        p99_ms=p99 * 1000,
        latency_ms=latency * 1000,
        setup_s=setup,
    )


class _OriginalPipe:
    """The object the original StreamDiffusion is built from, backed by our components."""

    def __init__(self, components, device: torch.device, dtype: torch.dtype) -> None:
        self.device = device
        self.dtype = dtype
        self.vae_scale_factor = 8
        self.unet = components.unet
        self.vae = components.vae
        self.text_encoder = components.text_encoder
        self.scheduler = components.scheduler
        self._prompts = PromptEncoder(components.tokenizer, components.text_encoder)

    def _embed(self, prompt: str) -> torch.Tensor:
        return self._prompts(prompt).to(self.dtype)

    def encode_prompt(
        self,
        prompt,
        device=None,
        num_images_per_prompt=1,
        do_classifier_free_guidance=False,
        negative_prompt=None,
        **_,
    ):
        negative = None
        if do_classifier_free_guidance:
            negative = self._embed(negative_prompt or "")
        return self._embed(prompt), negative


# The baselines, by the name a case gives them, and the implementation their results report.
_IMPLEMENTATIONS = {"original": "original", "diffusers-xl": "diffusers"}


def run_original(case: Case, components, frames: int, warmup: int) -> Result:
    """Time the original StreamDiffusion class on `case`."""
    from streamdiffusion import StreamDiffusion as Original

    device, dtype = components.unet.device, components.unet.dtype
    started = time.perf_counter()
    with torch.inference_mode():
        original = Original(
            _OriginalPipe(components, device, dtype),
            t_index_list=list(case.t_index_list),
            torch_dtype=dtype,
            width=case.width,
            height=case.height,
            frame_buffer_size=case.frame_buffer_size,
            cfg_type=case.cfg_type,
        )
        original.prepare(PROMPT, num_inference_steps=50, guidance_scale=1.2, delta=1.0)
        image = torch.rand(
            (case.frame_buffer_size, 3, case.height, case.width), device=device, dtype=dtype
        )
        if case.mode == "txt2img":

            def step():
                return original.txt2img(case.frame_buffer_size)
        else:

            def step():
                return original(image)

        setup = time.perf_counter() - started
        times = _time_frames(step, frames, warmup, device)
    return _result(case, "original", "none", times, setup)


def run_diffusers_xl(case: Case, components, frames: int, warmup: int) -> Result:
    """Time diffusers' StableDiffusionXLImg2ImgPipeline on `case`, one UNet call per frame."""
    from diffusers import LCMScheduler, StableDiffusionXLImg2ImgPipeline

    device, dtype = components.unet.device, components.unet.dtype
    started = time.perf_counter()
    pipeline = StableDiffusionXLImg2ImgPipeline(
        **components.pipeline_networks(),
        scheduler=LCMScheduler.from_config(components.scheduler.config),
        add_watermarker=False,
    )
    pipeline.set_progress_bar_config(disable=True)
    with torch.inference_mode():
        # The prompt is encoded once, as ours is: the timings are of the frames alone.
        embeds, _, pooled, _ = pipeline.encode_prompt(
            PROMPT, device=device, do_classifier_free_guidance=False
        )
        image = torch.rand(
            (case.frame_buffer_size, 3, case.height, case.width), device=device, dtype=dtype
        )

        def step():
            # Two steps at strength 0.5 run the UNet once, as sdxl-turbo's img2img example does.
            return pipeline(
                image=image,
                prompt_embeds=embeds.expand(case.frame_buffer_size, -1, -1),
                pooled_prompt_embeds=pooled.expand(case.frame_buffer_size, -1),
                num_inference_steps=2,
                strength=0.5,
                guidance_scale=0.0,
                output_type="pt",
            ).images

        setup = time.perf_counter() - started
        times = _time_frames(step, frames, warmup, device)
    return _result(case, "diffusers", "none", times, setup)


def run_ours(
    case: Case,
    components,
    accel: str,
    frames: int,
    warmup: int,
    ip_adapter=None,
    precision: str = "default",
    controlnets: Sequence = (),
    compile_scope: str = "model",
) -> Result:
    """Time our pipeline on `case` with one acceleration mode and UNet precision.

    With `ip_adapter` (loaded on `components`) it follows a random picture, and the time to
    encode a new picture is reported too; `controlnets` are the models of `case.controlnets`.
    """
    device = components.unet.device
    reference = components.unet
    if precision != "default":
        components = dataclasses.replace(components, unet=shared_copy(reference))
    started = time.perf_counter()
    stream = StreamDiffusion(
        components,
        case.config(),
        prompt=PROMPT,
        controlnets=[
            ControlNet(model, source)
            for model, source in zip(controlnets, case.controlnets, strict=True)
        ],
    )
    accelerate(stream, accel, precision=precision, compile_scope=compile_scope)
    picture = torch.randint(0, 256, (case.height, case.width, 3), dtype=torch.uint8)
    if ip_adapter is not None:
        stream.image_prompt.set_image_tokens(ip_adapter.image_tokens(picture))
        stream.image_prompt.set_scale(0.6)
    shape = (case.frame_buffer_size, case.height, case.width, 3)
    # Two pictures far apart (random pixels), taken in turn when the filter is on, so that it
    # decides on every frame and skips none.
    inputs = [
        torch.randint(0, 256, shape, dtype=torch.uint8, device=device)
        for _ in range(2 if case.similarity_filter else 1)
    ]
    if device.type == "cuda":
        # They are on the device from here on, as an upload's event would say.
        on_device = torch.cuda.Event()
        on_device.record()
        for tensor in inputs:
            mark_uploaded(tensor, on_device)
    calls = itertools.count()
    if case.mode == "txt2img":

        def step():
            return stream.txt2img()
    else:

        def step():
            return stream.img2img(inputs[next(calls) % len(inputs)])

    # The first frames fill the buffer and, where asked, compile and capture: part of set-up.
    with torch.inference_mode():
        for _ in range(3):
            step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        setup = time.perf_counter() - started
        times = _time_frames(step, frames, warmup, device)
        result = _result(case, "ours", accel, times, setup)
        result.precision = precision
        result.compile_scope = compile_scope
        # Frames launched back to back, none waited for until the last (the engine keeps at
        # most two in flight): what a decision or a launch can overlap with the step before it
        # shows here.
        pipelined = _pipelined_fps(step, frames, device)
        result.extra["pipelined_fps"] = pipelined * case.frame_buffer_size
        if precision != "default":
            result.extra[precision] = precision_report(stream, reference)
    if stream.accelerator is not None:
        result.extra["captures"] = stream.accelerator.captures
    if ip_adapter is not None:
        encodings = _time_frames(lambda: ip_adapter.image_tokens(picture), frames, warmup, device)
        result.extra["style_embed_ms"] = statistics.median(encodings) * 1000
    if stream.controlnets is not None:
        result.extra["controlnets"] = len(stream.controlnets)
    if case.similarity_filter:
        result.extra["frames_skipped"] = stream.frames_skipped
        # The similarity of the last two pictures compared: 0.0 if the filter never compared.
        result.extra["last_similarity"] = stream.similarity_filter.last_similarity
    return result


def precision_report(stream: StreamDiffusion, reference: torch.nn.Module) -> dict:
    """Which UNet layers run in float8, and how far the UNet's output is from `reference`'s
    (the same model before conversion) on one call at the stream's shapes."""
    layers = converted_layers(stream.unet)
    groups: dict[str, int] = {}
    for name in layers:
        groups[layer_group(name)] = groups.get(layer_group(name), 0) + 1
    args, kwargs = unet_inputs(stream)
    error = unet_error(reference, stream.unet, args, kwargs)
    return {
        "latent_cosine": error["cosine"],
        "latent_max_abs": error["max_abs"],
        "reference_max_abs": error["reference_max_abs"],
        "converted": len(layers),
        "by_group": groups,
        "layers": layers,
    }


def run_canny(
    case: Case, accel: str, frames: int, warmup: int, device: torch.device, dtype: torch.dtype
) -> Result:
    """Time the canny preprocessor alone on one frame of the case's size, as the frame step runs
    it: eager, and under a CUDA graph with accel cudagraph or compile (which compiles the
    networks, not the preprocessor)."""
    started = time.perf_counter()
    images = torch.rand((case.frame_buffer_size, 3, case.height, case.width), device=device)
    images = images.to(dtype)
    low = torch.tensor(100.0, device=device)
    high = torch.tensor(200.0, device=device)
    with torch.inference_mode():
        if accel == "none":

            def step():
                return canny(images, low, high)
        else:
            side = torch.cuda.Stream(device)
            side.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(side):
                for _ in range(3):
                    canny(images, low, high)
            torch.cuda.current_stream(device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                canny(images, low, high)
            step = graph.replay
        setup = time.perf_counter() - started
        times = _time_frames(step, frames, warmup, device)
    return _result(case, "ours", accel, times, setup)


def run_bench(
    case_names: Sequence[str],
    accels: Sequence[str],
    *,
    frames: int,
    warmup: int,
    original: bool,
    device: torch.device,
    dtype: torch.dtype,
    precisions: Sequence[str] = ("default",),
    compile_scopes: Sequence[str] = ("model",),
    log: Callable[[str], None] = print,
) -> list[Result]:
    """Run the named cases; an implementation that fails records its error and the rest go on.

    `original` asks for the original StreamDiffusion on the cases it can run; SDXL cases always
    run their diffusers baseline. Accelerations that need CUDA are left out on other devices.
    Our pipeline runs once per acceleration and per UNet precision in `precisions`, and a
    compile run once per scope in `compile_scopes`.
    """
    cases = {**GPU_CASES, **CPU_CASES, **CPU_SMOKE_CASES}
    unknown = [name for name in case_names if name not in cases]
    if unknown:
        raise ValueError(f"unknown bench case {unknown[0]!r}; choose from {', '.join(cases)}.")
    for precision in precisions:
        if precision not in PRECISIONS:
            raise ValueError(
                f"unknown precision {precision!r}; choose from {', '.join(PRECISIONS)}."
            )
    for scope in compile_scopes:
        if scope not in COMPILE_SCOPES:
            raise ValueError(
                f"unknown compile scope {scope!r}; choose from {', '.join(COMPILE_SCOPES)}."
            )
    if device.type != "cuda" and any(accel != "none" for accel in accels):
        log(f"note: accel {', '.join(accels)} needs CUDA; on {device} only accel none runs.")
        accels = ["none"]
    results: list[Result] = []
    loaded: dict[str, object] = {}
    adapters: dict[str, object] = {}
    for name in case_names:
        case = cases[name]
        key = (
            f"{case.model} loras={case.loras} fused={case.fuse_loras} ip={case.ip_adapter} "
            f"cn={case.controlnets}"
        )
        if not case.preprocessor and key not in loaded:
            # The previous case's models go before the next load, so that peak memory is this
            # case's alone.
            components = controlnet_models = None
            loaded.clear()
            adapters.clear()
            _release(device)
            log(f"loading {case.model} on {device} ({dtype})")
            load_started = time.perf_counter()
            components = load_components(case.model, vae="tiny", device=device, dtype=dtype)
            _add_loras(components, case)
            if case.ip_adapter:
                adapters[key] = _add_ip_adapter(components, case)
            controlnet_models = _load_controlnets(components, case)
            log(f"loaded {case.model} in {time.perf_counter() - load_started:.1f} s")
            if device.type == "cuda":
                # Both implementations run on the same memory layout.
                components.unet.to(memory_format=torch.channels_last)
                components.vae.to(memory_format=torch.channels_last)
            loaded[key] = (components, controlnet_models)
        components, controlnet_models = loaded.get(key, (None, []))
        baseline = case.baseline == "diffusers-xl" or (original and case.baseline == "original")
        ours = our_runs(accels, precisions, compile_scopes)
        runs = ([(case.baseline, "default", "model")] if baseline else []) + ours
        for accel, precision, scope in runs:
            resident = 0.0
            if device.type == "cuda":
                # Graphs of the previous run may sit in reference cycles until collected.
                _release(device)
                torch.cuda.reset_peak_memory_stats(device)
                resident = torch.cuda.memory_allocated(device) / 2**20
            try:
                if case.preprocessor:
                    result = run_canny(case, accel, frames, warmup, device, dtype)
                elif accel == "original":
                    result = run_original(case, components, frames, warmup)
                elif accel == "diffusers-xl":
                    result = run_diffusers_xl(case, components, frames, warmup)
                else:
                    result = run_ours(
                        case,
                        components,
                        accel,
                        frames,
                        warmup,
                        ip_adapter=adapters.get(key),
                        precision=precision,
                        controlnets=controlnet_models,
                        compile_scope=scope,
                    )
            except Exception as error:  # a failing implementation must not hide the others
                implementation = _IMPLEMENTATIONS.get(accel, "ours")
                result = Result(
                    case.name,
                    implementation,
                    "none" if accel in _IMPLEMENTATIONS else accel,
                    0,
                    0.0,
                    0.0,
                    0.0,
                    0.0,
                    0.0,
                    error=f"{type(error).__name__}: {error}",
                    precision=precision,
                    compile_scope=scope,
                )
            if device.type == "cuda":
                result.peak_memory_mb = torch.cuda.max_memory_allocated(device) / 2**20
                # What was held before the run began: the models and their adapters.
                result.extra["resident_mb"] = round(resident, 1)
            results.append(result)
            log(format_row(result))
            if "pipelined_fps" in result.extra:
                log(f"  launched back to back: {result.extra['pipelined_fps']:.1f} fps")
            if "style_embed_ms" in result.extra:
                encode = result.extra["style_embed_ms"]
                log(f"  a new IP-Adapter picture encodes in {encode:.2f} ms")
    return results


def our_runs(
    accels: Sequence[str], precisions: Sequence[str], compile_scopes: Sequence[str]
) -> list[tuple[str, str, str]]:
    """(accel, precision, compile scope) of each run of ours, in order: every precision for
    every accel, and a compile run once per scope (a scope means nothing to the others)."""
    return [
        (accel, precision, scope)
        for accel in accels
        for precision in precisions
        for scope in (compile_scopes if accel == "compile" else ("model",))
    ]


def _release(device: torch.device) -> None:
    """Free what nothing refers to any more, cycles included, and hand cached CUDA blocks back.

    Dynamo's traces go too: it keeps them per Python function for the whole process, so the
    blocks of one case would otherwise count against the recompile limit of the next, and a run
    would start with the traces of the run before it. So does the stance a compile run leaves
    (see `accelerate`), under which the next run would not compile its new shapes.
    """
    torch._dynamo.reset()
    set_compile_stance("default")
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _load_controlnets(components, case: Case) -> list:
    """One synthetic ControlNet of the model's architecture per ControlNet of the case."""
    from bridge.models.controlnet import load_controlnet

    device, dtype = components.unet.device, components.unet.dtype
    return [
        load_controlnet(CONTROLNETS[case.model], components.unet.config, device=device, dtype=dtype)
        for _ in case.controlnets
    ]


def _add_loras(components, case: Case) -> None:
    """Put the case's random LoRA files on the model, fused or live (at scale 0.8)."""
    if not case.loras:
        return
    from bridge.models.live_lora import load_live_loras
    from bridge.models.lora import fuse_loras
    from bridge.models.synthetic_lora import write_synthetic_lora

    folder = Path(tempfile.mkdtemp(prefix="sd-bridge-lora-"))
    loras = [
        (write_synthetic_lora(components, folder / f"lora{index}.safetensors", seed=index), 0.8)
        for index in range(case.loras)
    ]
    if case.fuse_loras:
        fuse_loras(components, loras)
    else:
        load_live_loras(components, loras)
    shutil.rmtree(folder)


def _add_ip_adapter(components, case: Case):
    """Put the model's synthetic IP-Adapter on its UNet; return it (it encodes pictures)."""
    from bridge.models.ip_adapter import load_ip_adapter
    from bridge.stream.ip_adapter import install

    adapter = load_ip_adapter(components, case.model)
    install(components.unet, adapter.empty_tokens())
    return adapter


def format_row(result: Result) -> str:
    """One line of the results table."""
    if result.error:
        return (
            f"| {result.case} | {result.implementation} | {result.label} | failed: {result.error} |"
        )
    return (
        f"| {result.case} | {result.implementation} | {result.label} | {result.fps:.1f} | "
        f"{result.p50_ms:.2f} | {result.p99_ms:.2f} | {result.latency_ms:.2f} | "
        f"{result.peak_memory_mb:.0f} |"
    )


def table(results: Sequence[Result]) -> str:
    """A markdown table with the speed-up of each of our runs over the baseline of that case
    (the original StreamDiffusion, or diffusers for SDXL) and each run's peak GPU memory."""
    baselines = set(_IMPLEMENTATIONS.values())
    original = {r.case: r.fps for r in results if r.implementation in baselines and not r.error}
    lines = [
        "| case | implementation | accel | fps | p50 ms | p99 ms | latency ms | peak GPU MiB "
        "| vs baseline |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        if r.error:
            lines.append(f"| {r.case} | {r.implementation} | {r.label} | failed: {r.error} ||||||")
            continue
        ratio = f"{r.fps / original[r.case]:.2f}x" if r.case in original else ""
        lines.append(
            f"| {r.case} | {r.implementation} | {r.label} | {r.fps:.1f} | {r.p50_ms:.2f} | "
            f"{r.p99_ms:.2f} | {r.latency_ms:.2f} | {r.peak_memory_mb:.0f} | {ratio} |"
        )
    return "\n".join(lines)


def write_report(results: Sequence[Result], device: torch.device, out_dir: Path) -> Path:
    """Write results.json and chart.png into `out_dir`; return the JSON path."""
    out_dir.mkdir(parents=True, exist_ok=True)
    report = {
        "date": date.today().isoformat(),
        "device": device_name(device),
        "torch": torch.__version__,
        "results": [asdict(r) for r in results],
    }
    path = out_dir / "results.json"
    path.write_text(json.dumps(report, indent=2))
    draw_chart(results, report["device"], out_dir / "chart.png")
    return path


def draw_chart(results: Sequence[Result], title: str, path: Path) -> None:
    """A horizontal bar chart of fps per case and implementation, drawn with Pillow."""
    from PIL import Image, ImageDraw

    rows = [r for r in results if not r.error]
    bar_height, left, width = 22, 430, 420
    image = Image.new("RGB", (left + width + 80, 40 + bar_height * max(1, len(rows))), "white")
    draw = ImageDraw.Draw(image)
    draw.text((10, 10), f"frames per second, {title}", fill="black")
    top = max((r.fps for r in rows), default=1.0) or 1.0
    colours = {
        "original": (150, 150, 150),
        "none": (90, 140, 220),
        "cudagraph": (60, 170, 110),
        "compile": (220, 120, 50),
    }
    for row, r in enumerate(rows):
        y = 35 + row * bar_height
        label = f"{r.case} - {r.implementation} {r.label if r.implementation == 'ours' else ''}"
        draw.text((10, y + 4), label[:70], fill="black")
        length = int(width * r.fps / top)
        colour = colours["original"] if r.implementation != "ours" else colours.get(r.accel)
        draw.rectangle([left, y + 2, left + length, y + bar_height - 4], fill=colour)
        draw.text((left + length + 5, y + 4), f"{r.fps:.1f}", fill="black")
    image.save(path)
