"""`sd-bridge`: run the bridge, benchmark it, and check what this machine offers."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

EXIT_USAGE = 2


def _dtype(name: str):
    import torch

    dtypes = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
    if name not in dtypes:
        raise SystemExit(f"dtype {name!r} is unknown; use one of {', '.join(dtypes)}.")
    return dtypes[name]


def _device(name: str | None):
    import torch

    if name:
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def cmd_bench(args: argparse.Namespace) -> int:
    """Benchmark our pipeline against the original StreamDiffusion."""
    from bridge.runtime import bench

    device = _device(args.device)
    on_gpu = device.type == "cuda"
    cases = (
        args.cases.split(",")
        if args.cases
        else list(bench.GPU_CASES if on_gpu else bench.CPU_CASES)
    )
    accels = (
        args.accel.split(",")
        if args.accel
        else (["none", "cudagraph", "compile"] if on_gpu else ["none"])
    )
    original = args.original and on_gpu and _original_available()
    if args.original and not original:
        reason = "it needs CUDA" if not on_gpu else "the streamdiffusion package is not installed"
        print(f"note: the original StreamDiffusion is skipped: {reason}.")
    dtype = _dtype(args.dtype or ("fp16" if on_gpu else "fp32"))
    print(f"device: {bench.device_name(device)}, dtype {args.dtype or dtype}")
    results = bench.run_bench(
        cases,
        accels,
        frames=args.frames,
        warmup=args.warmup,
        original=original,
        device=device,
        dtype=dtype,
    )
    print(bench.table(results))
    path = bench.write_report(results, device, Path(args.out))
    print(f"wrote {path} and {path.with_name('chart.png')}")
    return 1 if any(r.error for r in results) else 0


def _original_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("streamdiffusion") is not None


def build_parser() -> argparse.ArgumentParser:
    """The command-line interface."""
    parser = argparse.ArgumentParser(
        prog="sd-bridge",
        description="Live StreamDiffusion for VJ rigs: frames in, diffused frames out, OSC knobs.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    bench = sub.add_parser("bench", help="benchmark against the original StreamDiffusion")
    bench.add_argument("--cases", help="comma-separated case names (default: all for the device)")
    bench.add_argument("--accel", help="comma-separated modes: none, cudagraph, compile")
    bench.add_argument("--frames", type=int, default=200, help="timed frames per run")
    bench.add_argument("--warmup", type=int, default=20, help="untimed frames per run")
    bench.add_argument("--device", help="cuda, cuda:1, mps or cpu (default: the best there is)")
    bench.add_argument("--dtype", help="fp16, bf16 or fp32 (default: fp16 on GPU, fp32 on CPU)")
    bench.add_argument(
        "--no-original",
        dest="original",
        action="store_false",
        help="do not run the original StreamDiffusion",
    )
    bench.add_argument(
        "--out", default="bench-results", help="folder for results.json and chart.png"
    )
    bench.set_defaults(func=cmd_bench)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `sd-bridge` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except ValueError as error:
        print(f"sd-bridge: {error}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
