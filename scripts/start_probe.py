"""Where one start's time goes, and the speed it starts into: one process, phase by phase.

    python scripts/start_probe.py --accel compile --compile-scope model --json model.json
    python scripts/start_probe.py --accel compile --compile-scope blocks --json blocks.json

Run each twice with the same `SD_BRIDGE_CACHE`: the first start fills the compile cache, the
second is the warm start a user gets every time after. The script imports the bridge, loads the
model, builds the pipeline, accelerates it and runs three frames, timing each phase from the
script's first line (the interpreter's own start-up is not in it), then runs `--frames` more
frames launched back to back for the frame rate. Dynamo's own counters give how much of the
start was its bytecode tracing and guard building, and how many graphs it traced. The JSON is
rewritten after each phase, so a start that dies shows how far it got.
"""

from __future__ import annotations

import time

STARTED = time.perf_counter()

import argparse  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

from bridge.accel import COMPILE_SCOPES, accelerate  # noqa: E402
from bridge.models import load_components  # noqa: E402
from bridge.stream import StreamConfig, StreamDiffusion  # noqa: E402

IMPORTED = time.perf_counter()
# Dynamo's phases worth reporting, by their names in `torch._dynamo.utils.compile_times`.
DYNAMO_PHASES = {"bytecode_tracing": "dynamo_tracing_s", "build_guards": "dynamo_guards_s"}


class Report(dict):
    """The measurements so far, written to `path` (if any) at every `put`."""

    def __init__(self, path: str | None) -> None:
        super().__init__()
        self.path = Path(path) if path else None

    def put(self, key: str, value) -> None:
        self[key] = round(value, 3) if isinstance(value, float) else value
        print(f"{key}: {self[key]}", flush=True)
        if self.path is not None:
            self.path.write_text(json.dumps(self, indent=1))


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def dynamo_phases(report: Report) -> None:
    """Dynamo's own seconds per phase, summed over every graph it traced."""
    from torch._dynamo.utils import compile_times, counters

    times = compile_times(repr="raw", aggregate=True) or {}
    for name, key in DYNAMO_PHASES.items():
        if name in times:
            report.put(key, float(times[name]))
    report.put("dynamo_graphs", int(counters["stats"]["unique_graphs"]))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="synthetic:sd-turbo")
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--accel", default="compile", choices=("none", "cudagraph", "compile"))
    parser.add_argument("--compile-scope", default="model", choices=COMPILE_SCOPES)
    parser.add_argument("--frames", type=int, default=300, help="frames timed after the start")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", help="write the report here")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    report = Report(args.json)
    report.put("settings", vars(args) | {"torch": torch.__version__})
    report.put("import_s", IMPORTED - STARTED)

    started = time.perf_counter()
    components = load_components(args.model, vae="tiny", device=device, dtype=dtype)
    synchronize(device)
    report.put("load_s", time.perf_counter() - started)

    started = time.perf_counter()
    config = StreamConfig(
        width=args.size, height=args.size, t_index_list=(32,), cfg_type="none", seed=1
    )
    stream = StreamDiffusion(components, config, prompt="a fox in the snow")
    accelerate(stream, args.accel, compile_scope=args.compile_scope)
    synchronize(device)
    report.put("accelerate_s", time.perf_counter() - started)

    pixels = torch.randint(0, 256, (1, args.size, args.size, 3), dtype=torch.uint8).to(device)
    with torch.inference_mode():
        for index in range(3):
            started = time.perf_counter()
            stream.img2img(pixels)
            synchronize(device)
            report.put(f"frame{index}_s", time.perf_counter() - started)
        report.put("to_third_frame_s", time.perf_counter() - STARTED)
        dynamo_phases(report)
        started = time.perf_counter()
        for _ in range(args.frames):
            stream.img2img(pixels)
        synchronize(device)
        report.put("fps_back_to_back", args.frames / (time.perf_counter() - started))
    if device.type == "cuda":
        report.put("peak_memory_mb", torch.cuda.max_memory_allocated(device) / 2**20)
    return 0


if __name__ == "__main__":
    sys.exit(main())
