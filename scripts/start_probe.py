"""Where one start's time goes, the speed it starts into, and the pauses live changes make.

    python scripts/start_probe.py --accel compile --compile-scope model --json model.json
    python scripts/start_probe.py --accel compile --compile-scope blocks --changes --json b.json

Run each twice with the same `SD_BRIDGE_CACHE`: the first start fills the compile cache, the
second is the warm start a user gets every time after. The script imports the bridge, loads the
model, builds the pipeline, accelerates it and runs three frames, timing each phase from the
script's first line (the interpreter's own start-up is not in it), then runs `--frames` more
frames launched back to back for the frame rate. Dynamo's own counters give how much of the
start was its bytecode tracing and guard building, and how many graphs it traced.

With `--changes` it then makes each live change of `CHANGES` that gives the frame step new shapes
or branches (the feature bank on and off, the number of steps, the resolution), each new one and
then again once seen. Under a CUDA graph each captures the step again. Under torch.compile a
shape or branch not run since the start is traced and compiled first, while a bridge would
hold its last frame, or with `--no-live-compile` runs uncompiled. For each change it reports
the first frame after it (the pause a VJ sees), the median of the frames that follow, the
output's shape, and how many graphs Dynamo traced and captures were made for it.

With `--background-compile` the first frames run uncompiled while a thread compiles; the probe
then runs frames until the compiled networks take over and reports when that was, and the frame
rate and slowest frame meanwhile.

The JSON is rewritten after each phase, so a run that dies shows how far it got.
"""

from __future__ import annotations

import time

STARTED = time.perf_counter()

import argparse  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
from torch._dynamo.utils import compile_times, counters  # noqa: E402

from bridge.accel import COMPILE_SCOPES, accelerate  # noqa: E402
from bridge.models import load_components  # noqa: E402
from bridge.stream import StreamConfig, StreamDiffusion  # noqa: E402

IMPORTED = time.perf_counter()
# Dynamo's phases worth reporting, by their names in `torch._dynamo.utils.compile_times`.
DYNAMO_PHASES = {"bytecode_tracing": "dynamo_tracing_s", "build_guards": "dynamo_guards_s"}
# Frames timed after each change, beside the first.
STEADY_FRAMES = 10
# A bound on the frames run while the background compile works (minutes of frames).
MAX_FRAMES_WHILE_COMPILING = 100_000


class Report(dict):
    """The measurements so far, written to `path` (if any) at every `put`."""

    def __init__(self, path: str | None) -> None:
        super().__init__()
        self.path = Path(path) if path else None

    def put(self, key: str, value, say: bool = True) -> None:
        self[key] = round(value, 3) if isinstance(value, float) else value
        if say:
            print(f"{key}: {self[key]}", flush=True)
        if self.path is not None:
            self.path.write_text(json.dumps(self, indent=1))


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def dynamo_phases(report: Report, graphs_before: int) -> None:
    """Dynamo's own seconds per phase, summed over every graph it traced in this process, and
    how many graphs it traced since `graphs_before` were counted."""
    times = compile_times(repr="raw", aggregate=True) or {}
    for name, key in DYNAMO_PHASES.items():
        if name in times:
            report.put(key, float(times[name]))
    # The phases' names change between PyTorch versions: the largest ones, whatever they are.
    largest = sorted(times.items(), key=lambda item: -float(item[1]))[:8]
    report.put("dynamo_largest_s", {name: round(float(value), 2) for name, value in largest})
    report.put("dynamo_graphs", int(counters["stats"]["unique_graphs"]) - graphs_before)


def changes(size: int) -> list[tuple[str, dict]]:
    """Each live change's name and its settings, in order: each change first, then once more."""
    wider = size + 128
    return [
        ("feature bank on", {"feature_bank_size": 1}),
        ("feature bank off", {"feature_bank_size": 0}),
        ("feature bank on again", {"feature_bank_size": 1}),
        ("feature bank off again", {"feature_bank_size": 0}),
        ("two steps", {"t_index_list": (20, 35)}),
        ("one step", {"t_index_list": (32,)}),
        ("two steps again", {"t_index_list": (20, 35)}),
        ("one step again", {"t_index_list": (32,)}),
        (f"{wider}x{wider}", {"width": wider, "height": wider}),
        (f"{size}x{size} again", {"width": size, "height": size}),
        (f"{wider}x{wider} again", {"width": wider, "height": wider}),
        (f"{size}x{size} once more", {"width": size, "height": size}),
    ]


def timed_frame(stream: StreamDiffusion, pixels: torch.Tensor) -> tuple[float, list[int]]:
    """Seconds one frame took, waited for, and the shape of the frame that came out."""
    started = time.perf_counter()
    out = stream.img2img(pixels)
    synchronize(stream.device)
    return time.perf_counter() - started, list(out.shape)


def frame_like(stream: StreamDiffusion) -> torch.Tensor:
    """A random frame at the stream's current size, on its device."""
    shape = (1, stream.config.height, stream.config.width, 3)
    return torch.randint(0, 256, shape, dtype=torch.uint8).to(stream.device)


def captures(stream: StreamDiffusion) -> int:
    return 0 if stream.accelerator is None else stream.accelerator.captures


def live_changes(stream: StreamDiffusion, size: int, report: Report) -> None:
    """Make each change of `changes` and report what the frames after it took."""
    done: list[dict] = []
    for name, settings in changes(size):
        graphs, captured = counters["stats"]["unique_graphs"], captures(stream)
        stream.update(**settings)
        pixels = frame_like(stream)
        first, shape = timed_frame(stream, pixels)
        steady = [timed_frame(stream, pixels)[0] for _ in range(STEADY_FRAMES)]
        entry = {
            "change": name,
            "output_shape": shape,
            "first_frame_s": round(first, 4),
            "steady_ms": round(statistics.median(steady) * 1000, 3),
            "graphs_traced": counters["stats"]["unique_graphs"] - graphs,
            "captures": captures(stream) - captured,
        }
        done.append(entry)
        print(json.dumps(entry), flush=True)
        report.put("changes", done, say=False)


def until_compiled(stream: StreamDiffusion, pixels: torch.Tensor, report: Report) -> None:
    """Frames, each waited for, until the background compile's networks have taken over."""
    times = []
    started = time.perf_counter()
    while stream.accelerator.compiling and len(times) < MAX_FRAMES_WHILE_COMPILING:
        times.append(timed_frame(stream, pixels)[0])
    report.put("compiled_at_s", time.perf_counter() - STARTED)
    report.put("frames_while_compiling", len(times))
    report.put("fps_while_compiling", len(times) / (time.perf_counter() - started))
    report.put("slowest_frame_while_compiling_s", max(times))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="synthetic:sd-turbo")
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--accel", default="compile", choices=("none", "cudagraph", "compile"))
    parser.add_argument("--compile-scope", default="model", choices=COMPILE_SCOPES)
    parser.add_argument("--frames", type=int, default=300, help="frames timed after the start")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--changes", action="store_true", help="then time each live change")
    parser.add_argument(
        "--no-live-compile",
        dest="live_compile",
        action="store_false",
        help="run the changes' new shapes uncompiled instead of compiling them first",
    )
    parser.add_argument(
        "--background-compile",
        action="store_true",
        help="serve uncompiled frames while compiling; report when the compiled ones take over",
    )
    parser.add_argument("--json", help="write the report here")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    report = Report(args.json)
    report.put("settings", vars(args) | {"torch": torch.__version__})
    report.put("import_s", IMPORTED - STARTED)
    graphs_before = int(counters["stats"]["unique_graphs"])

    started = time.perf_counter()
    components = load_components(args.model, vae="tiny", device=device, dtype=dtype)
    synchronize(device)
    report.put("load_s", time.perf_counter() - started)

    started = time.perf_counter()
    config = StreamConfig(
        width=args.size, height=args.size, t_index_list=(32,), cfg_type="none", seed=1
    )
    stream = StreamDiffusion(components, config, prompt="a fox in the snow")
    accelerate(
        stream,
        args.accel,
        compile_scope=args.compile_scope,
        live_compile=args.live_compile,
        compile_in_background=args.background_compile,
    )
    synchronize(device)
    report.put("accelerate_s", time.perf_counter() - started)

    pixels = frame_like(stream)
    with torch.inference_mode():
        for index in range(3):
            report.put(f"frame{index}_s", timed_frame(stream, pixels)[0])
        report.put("to_third_frame_s", time.perf_counter() - STARTED)
        if getattr(stream.accelerator, "compiling", False):
            until_compiled(stream, pixels, report)
        dynamo_phases(report, graphs_before)
        started = time.perf_counter()
        for _ in range(args.frames):
            stream.img2img(pixels)
        synchronize(device)
        report.put("fps_back_to_back", args.frames / (time.perf_counter() - started))
        if args.changes:
            live_changes(stream, args.size, report)
    if device.type == "cuda":
        report.put("peak_memory_mb", torch.cuda.max_memory_allocated(device) / 2**20)
    return 0


if __name__ == "__main__":
    sys.exit(main())
