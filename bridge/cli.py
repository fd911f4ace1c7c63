"""`sd-bridge`: run the bridge, benchmark it, and check what this machine offers."""

from __future__ import annotations

import argparse
import os
import sys
import threading
from collections.abc import Sequence
from dataclasses import fields
from pathlib import Path

from bridge.runtime.settings import (
    ACCEL_CHOICES,
    DTYPE_CHOICES,
    RunSettings,
    load_config,
    merge,
)

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


def _run_overrides(args: argparse.Namespace) -> dict:
    names = [f.name for f in fields(RunSettings)]
    return {name: getattr(args, name, None) for name in names}


def cmd_run(args: argparse.Namespace) -> int:
    """Start the bridge: input, pipeline, outputs and the OSC server, until stopped."""
    config = load_config(Path(args.config)) if args.config else {}
    settings = merge(config, _run_overrides(args))
    return run_bridge(settings)


def run_bridge(settings: RunSettings) -> int:
    """Run the bridge with `settings`; returns the process exit code."""
    import torch
    from rich.console import Console

    from bridge.accel import accelerate
    from bridge.control import OscServer, OscServerError, ParamStore
    from bridge.control.osc_server import parse_target
    from bridge.io import TransportError, open_sink, open_source
    from bridge.models import load_components
    from bridge.runtime.engine import Engine, EngineHooks
    from bridge.runtime.signals import stop_on_signals
    from bridge.stream import StreamDiffusion

    console = Console(stderr=True, quiet=settings.quiet)
    store = ParamStore(settings.store_values())
    device = _device(None if settings.device == "auto" else settings.device)
    dtype = _dtype(
        ("fp16" if device.type == "cuda" else "fp32")
        if settings.dtype == "auto"
        else settings.dtype
    )
    accel = (
        settings.accel
        if settings.accel != "auto"
        else ("cudagraph" if device.type == "cuda" else "none")
    )
    config = settings.stream_config()
    source = None
    sinks = []
    osc = None
    stop = threading.Event()
    try:
        if settings.mode == "img2img":
            source = open_source(
                settings.input, width=settings.width, height=settings.height, fps=settings.fps
            )
        sinks = [
            open_sink(uri, width=settings.width, height=settings.height, fps=settings.fps)
            for uri in settings.output
        ]
        if settings.osc:
            osc = OscServer(
                store,
                settings.osc_host,
                settings.osc_port,
                allow=settings.osc_allow,
                feedback=[parse_target(t) for t in settings.osc_feedback],
                on_quit=stop.set,
            )
            osc.start()
        with console.status(
            f"loading {settings.model} on {device} ({str(dtype).removeprefix('torch.')})"
        ):
            components = load_components(
                settings.model,
                vae=None if settings.vae == "model" else settings.vae,
                loras=[_lora(text) for text in settings.lora],
                lcm_lora=settings.lcm_lora or None,
                device=device,
                dtype=dtype,
            )
        with console.status(f"preparing the stream ({accel})"):
            with torch.inference_mode():
                stream = accelerate(
                    StreamDiffusion(
                        components,
                        config,
                        prompt=settings.prompt,
                        negative_prompt=settings.negative_prompt,
                    ),
                    accel,
                )
    except (ValueError, FileNotFoundError, TransportError, OscServerError) as error:
        print(f"sd-bridge: {error}", file=sys.stderr)
        _close_all(source, sinks, osc)
        return EXIT_USAGE
    hooks = EngineHooks(
        status=lambda status: _show_status(console, status, osc),
        error=osc.report_error if osc is not None else None,
        input_state=osc.publish_input if osc is not None else None,
    )
    try:
        engine = Engine(
            stream,
            store,
            source,
            sinks,
            hooks=hooks,
            on_input_loss=settings.on_input_loss,
            hold_fps=settings.fps,
        )
    except ValueError as error:
        print(f"sd-bridge: {error}", file=sys.stderr)
        _close_all(source, sinks, osc)
        return EXIT_USAGE
    where = f"OSC on {settings.osc_host}:{osc.address[1]}" if osc else "OSC off"
    console.print(
        f"running: {settings.input if source else 'txt2img'} -> {', '.join(settings.output)}"
        f" | {where} | Ctrl-C stops",
        markup=False,
        highlight=False,
        soft_wrap=True,
    )
    with stop_on_signals(stop), torch.inference_mode():
        produced = engine.run(stop, max_frames=settings.frames or None)
    _close_all(None, [], osc)
    console.print(f"stopped after {produced} frames.", markup=False, highlight=False)
    return 0


def _show_status(console, status, osc) -> None:
    console.print(status.line(), markup=False, highlight=False, soft_wrap=True)
    if osc is not None:
        osc.publish_status(status.fps, status.latency_ms, status.drops, status.skips)


def _close_all(source, sinks, osc) -> None:
    for transport in [source, *sinks]:
        if transport is not None:
            transport.close()
    if osc is not None:
        osc.stop()


def _lora(text: str) -> tuple[str, float]:
    path, _, scale = text.rpartition(":")
    if not path or not scale:
        return text, 1.0
    try:
        return path, float(scale)
    except ValueError:
        return text, 1.0


def _int_list(text: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a comma-separated list of integers, e.g. 32,45"
        ) from None


def cmd_list(args: argparse.Namespace) -> int:
    """Print the transports this machine can use and the devices that exist now."""
    from bridge.io import available_transports, enumerate_devices

    print("transports:")
    for info in available_transports():
        roles = "/".join(role for role, has in (("in", info.source), ("out", info.sink)) if has)
        state = "yes" if info.usable else "no "
        note = f"  ({info.reason})" if info.reason else ""
        print(f"  {state} {info.name:<8} {roles:<7} {info.usage}{note}")
    devices = enumerate_devices()
    print("devices:" if devices else "devices: none found")
    for device in devices:
        print(f"  {device.uri:<32} {device.kind}: {device.description}")
    return 0


def cmd_doctor(args: argparse.Namespace) -> int:
    """Print the GPU, library versions, usable transports and cached models."""
    import importlib.metadata
    import platform

    import torch

    from bridge.models.hub import hf_hub_cache

    print(f"python       {platform.python_version()} on {platform.platform()}")
    for package in ("torch", "diffusers", "transformers", "xformers", "python-osc", "SpoutGL"):
        try:
            version = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            version = "not installed"
        print(f"{package:<13}{version}")
    if torch.cuda.is_available():
        for index in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(index)
            memory = props.total_memory / 2**30
            print(f"gpu {index}        {props.name}, {memory:.0f} GiB, CUDA {torch.version.cuda}")
    else:
        print("gpu          none found by torch (CPU only: expect a few frames per second at most)")
    cache = hf_hub_cache()
    models = sorted(p.name[len("models--") :].replace("--", "/") for p in cache.glob("models--*"))
    print(f"hf cache     {cache}: {', '.join(models) if models else 'no models'}")
    print()
    return cmd_list(args)


def build_parser() -> argparse.ArgumentParser:
    """The command-line interface."""
    parser = argparse.ArgumentParser(
        prog="sd-bridge",
        description="Live StreamDiffusion for VJ rigs: frames in, diffused frames out, OSC knobs.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run the bridge", description="Run the bridge until Ctrl-C.")
    io = run.add_argument_group("input and output")
    io.add_argument(
        "--input",
        help="source URI (default pattern:bars): spout:NAME cam:0 shm:NAME file:PATH pattern:KIND",
    )
    io.add_argument(
        "--output",
        action="append",
        help="sink URI, repeatable (default shm:sd-bridge-out): spout:NAME vcam shm:NAME file:PATH",
    )
    io.add_argument("--fps", type=float, help="pace of pattern and file inputs (default 30)")
    io.add_argument(
        "--on-input-loss",
        dest="on_input_loss",
        choices=("last", "black"),
        help="while the input is gone, keep sending the last frame (default) or black",
    )
    model = run.add_argument_group("model")
    model.add_argument(
        "--model",
        help="diffusers folder, .safetensors file, Hugging Face id or synthetic:NAME "
        "(default stabilityai/sd-turbo)",
    )
    model.add_argument(
        "--vae", help="tiny (default), model (the model's own VAE), or a folder or id"
    )
    model.add_argument(
        "--lora", action="append", help="LoRA file, optionally PATH:SCALE; repeatable"
    )
    model.add_argument("--lcm-lora", dest="lcm_lora", help="LCM-LoRA file, fused at scale 1")
    model.add_argument("--device", help="cuda, cuda:1, mps or cpu (default: the best there is)")
    model.add_argument("--dtype", choices=DTYPE_CHOICES)
    model.add_argument(
        "--accel",
        choices=ACCEL_CHOICES,
        help="auto: cudagraph on CUDA, none elsewhere",
    )
    stream = run.add_argument_group("stream")
    stream.add_argument("--prompt")
    stream.add_argument("--negative-prompt", dest="negative_prompt")
    stream.add_argument("--t-index", dest="t_index", type=_int_list, help="steps, e.g. 32,45")
    stream.add_argument("--num-inference-steps", dest="num_inference_steps", type=int)
    stream.add_argument("--cfg", choices=("none", "full", "self", "initialize"))
    stream.add_argument("--guidance", type=float)
    stream.add_argument("--delta", type=float)
    stream.add_argument("--seed", type=int)
    stream.add_argument("--width", type=int)
    stream.add_argument("--height", type=int)
    stream.add_argument("--frame-buffer-size", dest="frame_buffer_size", type=int)
    stream.add_argument("--mode", choices=("img2img", "txt2img"))
    stream.add_argument("--filter", action="store_true", default=None, help="similarity filter on")
    stream.add_argument("--filter-threshold", dest="filter_threshold", type=float)
    stream.add_argument("--filter-max-skip", dest="filter_max_skip", type=int)
    control = run.add_argument_group("OSC")
    control.add_argument(
        "--osc-host", dest="osc_host", help="address to listen on (default 127.0.0.1)"
    )
    control.add_argument("--osc-port", dest="osc_port", type=int, help="UDP port (default 7000)")
    control.add_argument(
        "--osc-allow",
        dest="osc_allow",
        action="append",
        help="host or network allowed to send; repeatable; needed for a non-loopback --osc-host",
    )
    control.add_argument(
        "--osc-feedback",
        dest="osc_feedback",
        action="append",
        help="host:port that receives status and errors; repeatable",
    )
    control.add_argument(
        "--no-osc", dest="osc", action="store_false", default=None, help="no OSC server"
    )
    run.add_argument("--frames", type=int, help="stop after this many output frames")
    run.add_argument("--config", help="TOML file with the same settings; the command line wins")
    run.add_argument("--quiet", action="store_true", default=None, help="no status line")
    run.set_defaults(func=cmd_run)

    listing = sub.add_parser("list", help="transports and devices on this machine")
    listing.set_defaults(func=cmd_list)
    doctor = sub.add_parser("doctor", help="GPU, versions, transports and cached models")
    doctor.set_defaults(func=cmd_doctor)

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


def _quiet_libraries() -> None:
    """Keep the terminal for our own status: no library progress bars or advisory warnings."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TQDM_DISABLE", "1")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `sd-bridge` console script."""
    _quiet_libraries()
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except ValueError as error:
        print(f"sd-bridge: {error}", file=sys.stderr)
        return EXIT_USAGE


def entry() -> None:
    """The console script: `main`, then a prompt exit.

    Everything the bridge opened is closed before `main` returns; skipping the interpreter's
    slow teardown of torch and its threads keeps a stop within the promised two seconds.
    """
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    entry()
