"""`sd-bridge bench`: our pipeline against the original StreamDiffusion, same models, same run.

Each case names an architecture, a mode and the stream settings. For every case the original
(PyPI `streamdiffusion`, its `StreamDiffusion` class) runs first when it is installed, then our
pipeline once per acceleration mode, all on the very same model objects. Frames stay on the GPU
for both (a float tensor in for the original, which its API wants; uint8 in and out for ours),
and every frame is waited for, as a live stream must: the timings are per-frame latencies, and
fps is frames over wall-clock time.
"""

from __future__ import annotations

import json
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import date
from pathlib import Path

import torch

from bridge.accel import accelerate
from bridge.models import load_components
from bridge.stream import PromptEncoder, StreamConfig, StreamDiffusion

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

    def config(self) -> StreamConfig:
        return StreamConfig(
            width=self.width,
            height=self.height,
            t_index_list=self.t_index_list,
            cfg_type=self.cfg_type,
            mode=self.mode,
            frame_buffer_size=self.frame_buffer_size,
        )


GPU_CASES = {
    "turbo-img2img": Case(
        "sd-turbo img2img 1 step", "synthetic:sd-turbo", "img2img", (32,), "none"
    ),
    "turbo-img2img-fbs4": Case(
        "sd-turbo img2img 1 step, frame_buffer_size 4",
        "synthetic:sd-turbo",
        "img2img",
        (32,),
        "none",
        frame_buffer_size=4,
    ),
    "turbo-txt2img": Case("sd-turbo txt2img 1 step", "synthetic:sd-turbo", "txt2img", (0,), "none"),
    "sd15-img2img-rcfg": Case(
        "sd15 img2img [32, 45] RCFG self", "synthetic:sd15", "img2img", (32, 45), "self"
    ),
    "sd15-txt2img-4step": Case(
        "sd15 txt2img [0, 16, 32, 45]", "synthetic:sd15", "txt2img", (0, 16, 32, 45), "none"
    ),
    "turbo-img2img-768x432": Case(
        "sd-turbo img2img 1 step 768x432", "synthetic:sd-turbo", "img2img", (32,), "none", 768, 432
    ),
    "turbo-img2img-1024x576": Case(
        "sd-turbo img2img 1 step 1024x576",
        "synthetic:sd-turbo",
        "img2img",
        (32,),
        "none",
        1024,
        576,
    ),
}
CPU_CASES = {
    "tiny-img2img": Case(
        "tiny img2img [32, 45] RCFG self", "synthetic:tiny", "img2img", (32, 45), "self", 64, 64
    ),
    "tiny-txt2img": Case("tiny txt2img 1 step", "synthetic:tiny", "txt2img", (0,), "none", 64, 64),
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


def run_ours(case: Case, components, accel: str, frames: int, warmup: int) -> Result:
    """Time our pipeline on `case` with one acceleration mode."""
    device = components.unet.device
    started = time.perf_counter()
    stream = StreamDiffusion(components, case.config(), prompt=PROMPT)
    accelerate(stream, accel)
    pixels = torch.randint(
        0,
        256,
        (case.frame_buffer_size, case.height, case.width, 3),
        dtype=torch.uint8,
        device=device,
    )
    if case.mode == "txt2img":

        def step():
            return stream.txt2img()
    else:

        def step():
            return stream.img2img(pixels)

    # The first frames fill the buffer and, where asked, compile and capture: part of set-up.
    with torch.inference_mode():
        for _ in range(3):
            step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        setup = time.perf_counter() - started
        times = _time_frames(step, frames, warmup, device)
    result = _result(case, "ours", accel, times, setup)
    if stream.accelerator is not None:
        result.extra["captures"] = stream.accelerator.captures
    return result


def run_bench(
    case_names: Sequence[str],
    accels: Sequence[str],
    *,
    frames: int,
    warmup: int,
    original: bool,
    device: torch.device,
    dtype: torch.dtype,
    log: Callable[[str], None] = print,
) -> list[Result]:
    """Run the named cases; an implementation that fails records its error and the rest go on."""
    cases = {**GPU_CASES, **CPU_CASES}
    unknown = [name for name in case_names if name not in cases]
    if unknown:
        raise ValueError(f"unknown bench case {unknown[0]!r}; choose from {', '.join(cases)}.")
    results: list[Result] = []
    loaded: dict[str, object] = {}
    for name in case_names:
        case = cases[name]
        if case.model not in loaded:
            loaded.clear()
            if device.type == "cuda":
                torch.cuda.empty_cache()
            log(f"loading {case.model} on {device} ({dtype})")
            load_started = time.perf_counter()
            components = load_components(case.model, vae="tiny", device=device, dtype=dtype)
            log(f"loaded {case.model} in {time.perf_counter() - load_started:.1f} s")
            if device.type == "cuda":
                # Both implementations run on the same memory layout.
                components.unet.to(memory_format=torch.channels_last)
                components.vae.to(memory_format=torch.channels_last)
            loaded[case.model] = components
        components = loaded[case.model]
        runs = (["original"] if original else []) + list(accels)
        for accel in runs:
            try:
                if accel == "original":
                    result = run_original(case, components, frames, warmup)
                else:
                    result = run_ours(case, components, accel, frames, warmup)
            except Exception as error:  # a failing implementation must not hide the others
                implementation = "original" if accel == "original" else "ours"
                result = Result(
                    case.name,
                    implementation,
                    "none" if accel == "original" else accel,
                    0,
                    0.0,
                    0.0,
                    0.0,
                    0.0,
                    0.0,
                    error=f"{type(error).__name__}: {error}",
                )
            results.append(result)
            log(format_row(result))
    return results


def format_row(result: Result) -> str:
    """One line of the results table."""
    if result.error:
        return (
            f"| {result.case} | {result.implementation} | {result.accel} | failed: {result.error} |"
        )
    return (
        f"| {result.case} | {result.implementation} | {result.accel} | {result.fps:.1f} | "
        f"{result.p50_ms:.2f} | {result.p99_ms:.2f} | {result.latency_ms:.2f} |"
    )


def table(results: Sequence[Result]) -> str:
    """A markdown table with the speed-up of each of our runs over the original on that case."""
    original = {r.case: r.fps for r in results if r.implementation == "original" and not r.error}
    lines = [
        "| case | implementation | accel | fps | p50 ms | p99 ms | latency ms | vs original |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        if r.error:
            lines.append(f"| {r.case} | {r.implementation} | {r.accel} | failed: {r.error} |||||")
            continue
        ratio = f"{r.fps / original[r.case]:.2f}x" if r.case in original else ""
        lines.append(
            f"| {r.case} | {r.implementation} | {r.accel} | {r.fps:.1f} | {r.p50_ms:.2f} | "
            f"{r.p99_ms:.2f} | {r.latency_ms:.2f} | {ratio} |"
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
        label = f"{r.case} - {r.implementation} {r.accel if r.implementation == 'ours' else ''}"
        draw.text((10, y + 4), label[:70], fill="black")
        length = int(width * r.fps / top)
        colour = colours["original"] if r.implementation == "original" else colours.get(r.accel)
        draw.rectangle([left, y + 2, left + length, y + bar_height - 4], fill=colour)
        draw.text((left + length + 5, y + 4), f"{r.fps:.1f}", fill="black")
    image.save(path)
