"""Time the SD-Turbo UNet with float8 products against fp16 on one GPU, part by part.

    PYTHONPATH=. python scripts/fp8_probe.py --out fp8_probe.json --budget 480

The UNet is synthetic:sd-turbo's architecture with random weights, built on the GPU (speed does
not depend on weight values), at 512x512 and batch 1 and 4. In order:

1. layers: each distinct linear shape the UNet has (rows, inputs, outputs) as an fp16 `nn.Linear`,
   as an `Fp8Linear` with per-tensor and per-row scaling, and the input's quantization alone, each
   in a CUDA graph of 20 calls: which sizes pay.
2. graph: the whole UNet in eager PyTorch and replayed from a CUDA graph, fp16 against float8 with
   the default rule (per tensor and per row), with each layer group alone in float8 (attention
   projections, feed-forward, proj_in/out, time embedding, conv shortcuts), and with every
   aligned layer in float8; each with its output's cosine and largest difference from fp16.
3. compile: torch.compile (mode default) plus a CUDA graph, at batch 1 fp16 then float8 with the
   default rule, then the same at batch 4, each in a child process killed when it outruns its
   time (--compile-limit, and never past --budget); one that does not fit in what is left is
   skipped and says so.

Every part is written to the JSON file as soon as it ends (errors included), so a run cut short
still leaves what it measured. Progress goes to standard output.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import torch
from diffusers import UNet2DConditionModel
from torch import nn

from bridge.accel.fp8 import (
    EVERY_LAYER,
    GROUPS,
    Fp8Linear,
    Fp8Rule,
    check_kernel,
    convert,
    plan_fp8,
    quantize,
    record_rows,
    shared_copy,
)
from bridge.models.synthetic import SPECS

BATCHES = (1, 4)
REPLAYS = 100
# Calls of one layer per graph replay in the layer part, so that each replay is long enough to
# time.
REPEAT = 20
# Seconds kept back from the budget for writing results and ending a child process.
RESERVE_S = 15.0
# A compile given less time than this would not finish; it is skipped instead.
MIN_COMPILE_S = 45.0


class Report:
    """The JSON report, rewritten whole after every part."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.data: dict = {"parts": {}}

    def put(self, part: str, value: object) -> None:
        self.data["parts"][part] = value
        self.save()

    def save(self) -> None:
        partial = self.path.with_suffix(self.path.suffix + ".tmp")
        partial.write_text(json.dumps(self.data, indent=2))
        partial.replace(self.path)


def say(line: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {line}", flush=True)


def build_unet() -> nn.Module:
    torch.manual_seed(0)
    with torch.device("cuda"):
        unet = UNet2DConditionModel(**SPECS["sd-turbo"].unet)
    return unet.half().eval().to(memory_format=torch.channels_last)


def unet_call(batch: int) -> tuple[tuple, dict]:
    generator = torch.Generator(device="cuda").manual_seed(batch)
    latents = torch.randn(batch, 4, 64, 64, generator=generator, device="cuda").half()
    latents = latents.contiguous(memory_format=torch.channels_last)
    context = torch.randn(batch, 77, 1024, generator=generator, device="cuda").half()
    timesteps = torch.full((batch,), 500, device="cuda")
    return (latents, timesteps), {"encoder_hidden_states": context, "return_dict": False}


def graph_ms(step: Callable[[], object], replays: int = REPLAYS) -> float:
    """Median milliseconds of one replay of `step` captured as a CUDA graph."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    for _ in range(10):
        graph.replay()
    times = []
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def eager_ms(step: Callable[[], object], calls: int = 20) -> float:
    """Median milliseconds of one eager call of `step`, waited for."""
    for _ in range(3):
        step()
    torch.cuda.synchronize()
    times = []
    for _ in range(calls):
        started = time.perf_counter()
        step()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - started) * 1000)
    return statistics.median(times)


def row_scaling_works() -> bool:
    try:
        check_kernel(torch.device("cuda"), torch.float16, "row", torch.cuda.get_device_name())
    except ValueError as refused:
        say(f"per-row scaling with fp16 output: refused ({refused})")
        return False
    return True


def record_all_rows(unet: nn.Module) -> dict[int, dict[str, int]]:
    """Rows per call of every linear layer, at each batch size."""
    result = {}
    for batch in BATCHES:
        args, kwargs = unet_call(batch)
        with torch.no_grad():
            rows = record_rows(unet, lambda a=args, k=kwargs: unet(*a, **k))
        result[batch] = rows
    return result


def part_layers(unet: nn.Module, rows: dict[int, dict], row_ok: bool) -> list[dict]:
    """Each distinct (rows, in, out) shape: fp16 linear against the float8 variants."""
    shapes = set()
    for batch_rows in rows.values():
        plan = plan_fp8(unet, batch_rows, EVERY_LAYER)
        shapes |= {
            (s.rows, s.in_features, s.out_features)
            for name, s in plan.shapes.items()
            if name in plan.convert
        }
    results = []
    for m, k, n in sorted(shapes, key=lambda shape: -math.prod(shape)):
        layer = nn.Linear(k, n, device="cuda", dtype=torch.float16)
        x = torch.randn(m, k, device="cuda", dtype=torch.float16)
        row = {"rows": m, "in": k, "out": n, "gflop": round(2 * m * k * n / 1e9, 3)}
        variants = {
            "fp16_us": layer,
            "fp8_tensor_us": Fp8Linear.from_layer(layer),
            "quantize_only_us": lambda v: quantize(v),
        }
        if row_ok:
            variants["fp8_row_us"] = Fp8Linear.from_layer(layer, per_row=True)
        with torch.no_grad():
            for key, module in variants.items():
                try:
                    ms = graph_ms(lambda f=module, v=x: [f(v) for _ in range(REPEAT)], replays=20)
                    row[key] = round(ms * 1000 / REPEAT, 2)
                except Exception as error:  # one shape failing must not hide the others
                    row[key] = f"{type(error).__name__}: {error}"
        if isinstance(row.get("fp8_tensor_us"), float):
            row["fp8_tensor_speedup"] = round(row["fp16_us"] / row["fp8_tensor_us"], 2)
        say(f"layer {m}x{k}x{n}: {row}")
        results.append(row)
    return results


def part_graph(unet: nn.Module, rows: dict[int, dict], row_ok: bool, report: Report) -> None:
    """The whole UNet, eager and graphed, fp16 against each float8 variant."""
    variants: list[tuple[str, Fp8Rule | None, bool]] = [("fp16", None, False)]
    variants.append(("fp8 default rule, per tensor", Fp8Rule(), False))
    if row_ok:
        variants.append(("fp8 default rule, per row", Fp8Rule(), True))
    for group in GROUPS:
        rule = Fp8Rule(min_out_features=0, min_gflop=0.0, groups=frozenset({group}))
        variants.append((f"fp8 {group} only", rule, False))
    variants.append(("fp8 every aligned layer", EVERY_LAYER, False))
    results: dict[str, dict] = {}
    for batch in BATCHES:
        args, kwargs = unet_call(batch)
        with torch.no_grad():
            reference = unet(*args, **kwargs)[0].float()
        for label, rule, per_row in variants:
            key = f"batch {batch}: {label}"
            try:
                model = unet
                entry: dict = {}
                if rule is not None:
                    model = shared_copy(unet)
                    plan = plan_fp8(model, rows[batch], rule)
                    if not plan.convert:
                        results[key] = {"converted": 0, "note": "no layer of this kind runs"}
                        continue
                    convert(model, plan.convert, per_row=per_row)
                    entry = {"converted": len(plan.convert), "gflop": plan.converted_gflop()}

                def call(m=model, a=args, k=kwargs):
                    return m(*a, **k)

                with torch.no_grad():
                    entry["eager_ms"] = round(eager_ms(call), 3)
                    entry["graph_ms"] = round(graph_ms(call), 3)
                    if rule is not None:
                        out = model(*args, **kwargs)[0].float()
                        entry["cosine"] = nn.functional.cosine_similarity(
                            out.flatten(), reference.flatten(), dim=0
                        ).item()
                        entry["max_abs"] = (out - reference).abs().max().item()
                results[key] = entry
                say(f"{key}: {entry}")
            except Exception as error:  # one variant failing must not hide the others
                results[key] = {"error": f"{type(error).__name__}: {error}"}
                say(f"{key}: failed: {error}")
            del model
            torch.cuda.empty_cache()
            report.put("graph", results)


def child_compile(precision: str, batch: int, out: Path) -> None:
    """In a child process: compile the UNet (after conversion for fp8), graph it, time it."""
    report = Report(out)
    model = build_unet()
    args, kwargs = unet_call(batch)
    if precision == "fp8":
        with torch.no_grad():
            rows = record_rows(model, lambda: model(*args, **kwargs))
        convert(model, plan_fp8(model, rows).convert)
    compiled = torch.compile(model, mode="default", fullgraph=False, dynamic=False)
    started = time.perf_counter()
    with torch.no_grad():
        compiled(*args, **kwargs)
        torch.cuda.synchronize()
        compile_s = time.perf_counter() - started
        report.put("compile_s", round(compile_s, 1))
        say(f"compile {precision} batch {batch}: compiled in {compile_s:.0f} s")
        ms = graph_ms(lambda: compiled(*args, **kwargs))
    report.put("graph_ms", round(ms, 3))
    say(f"compile {precision} batch {batch}: {ms:.3f} ms a call in a CUDA graph")


def part_compile(precision: str, batch: int, limit_s: float, args: argparse.Namespace) -> dict:
    """Run `child_compile` in its own process, killed after `limit_s` seconds."""
    out = args.out.with_name(f"{args.out.stem}.compile-{precision}-{batch}.json")
    out.unlink(missing_ok=True)
    root = str(Path(__file__).resolve().parents[1])
    paths = [root, *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(paths)}
    # fp8's compile reuses the kernels fp16's compiled before it.
    env.setdefault("TORCHINDUCTOR_CACHE_DIR", str(args.out.parent / "fp8-probe-inductor"))
    script = str(Path(__file__).resolve())
    command = [sys.executable, script, "--child-compile", f"{precision}:{batch}"]
    command += ["--out", str(out)]
    say(f"compile {precision} batch {batch}: child process, at most {limit_s:.0f} s")
    with subprocess.Popen(command, env=env) as child:
        try:
            child.wait(timeout=limit_s)
            status = "finished" if child.returncode == 0 else f"exit code {child.returncode}"
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()
            status = f"stopped after {limit_s:.0f} s"
    result = json.loads(out.read_text())["parts"] if out.exists() else {}
    return {**result, "status": status}


def measure_in_process(report: Report, skip: set[str], left: Callable[[], float]) -> None:
    """The plans, and the layer and graph parts, on one UNet that is freed on return."""
    unet = build_unet()
    rows = record_all_rows(unet)
    row_ok = row_scaling_works()
    report.put(
        "plans",
        {
            f"batch {batch}": plan_fp8(unet, rows[batch]).summary() | {"per_row_works": row_ok}
            for batch in BATCHES
        },
    )
    parts = {
        "layers": lambda: report.put("layers", part_layers(unet, rows, row_ok)),
        "graph": lambda: part_graph(unet, rows, row_ok, report),
    }
    for part, run in parts.items():
        if part in skip:
            continue
        say(f"part {part} ({left():.0f} s left)")
        try:
            run()
        except Exception:  # a part failing must not hide the others
            report.put(f"{part} error", traceback.format_exc())
            say(f"part {part} failed:\n{traceback.format_exc()}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="JSON file to write")
    parser.add_argument("--budget", type=float, default=480.0, help="seconds for the whole run")
    parser.add_argument(
        "--compile-limit", type=float, default=150.0, help="seconds for each compile child"
    )
    parser.add_argument("--skip", default="", help="comma-separated parts to skip")
    parser.add_argument("--child-compile", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child_compile:
        precision, batch = args.child_compile.split(":")
        child_compile(precision, int(batch), args.out)
        return 0

    started = time.perf_counter()
    report = Report(args.out)
    skip = set(filter(None, args.skip.split(",")))

    def left() -> float:
        return args.budget - (time.perf_counter() - started)

    report.data["environment"] = {
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "device": torch.cuda.get_device_name(),
        "capability": list(torch.cuda.get_device_capability()),
        "budget_s": args.budget,
    }
    report.save()
    say(f"{report.data['environment']}")
    torch.backends.cudnn.benchmark = True
    measure_in_process(report, skip, left)
    torch.cuda.empty_cache()
    if "compile" not in skip:
        compiled: dict[str, object] = {}
        for batch in BATCHES:
            for precision in ("fp16", "fp8"):
                key = f"batch {batch}: {precision}"
                limit = min(args.compile_limit, left() - RESERVE_S)
                if limit < MIN_COMPILE_S:
                    compiled[key] = {"status": f"skipped: {max(left(), 0):.0f} s of budget left"}
                    say(f"compile {key}: skipped, the budget is spent")
                else:
                    try:
                        compiled[key] = part_compile(precision, batch, limit, args)
                    except Exception as error:  # the report must still be written
                        compiled[key] = {"status": f"{type(error).__name__}: {error}"}
                report.put("compile", compiled)
    report.data["elapsed_s"] = round(time.perf_counter() - started, 1)
    report.save()
    say(f"done in {report.data['elapsed_s']} s; wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
