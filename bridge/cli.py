"""`sd-bridge`: run the bridge, benchmark it, and check what this machine offers."""

from __future__ import annotations

import argparse
import os
import re
import sys
import typing
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from bridge.control.params import SETTINGS, SETTINGS_BY_KEY, Kind, Param, ParamError
from bridge.runtime.settings import load_config, merge, setting_help

EXIT_USAGE = 2
GROUP_ORDER = ("input and output", "model", "stream", "OSC", "run")


def cmd_bench(args: argparse.Namespace) -> int:
    """Benchmark our pipeline against the original StreamDiffusion."""
    from bridge.runtime import bench
    from bridge.runtime.launch import pick_device, pick_dtype

    device = pick_device(args.device or "auto")
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
    dtype = pick_dtype(args.dtype or "auto", device)
    print(f"device: {bench.device_name(device)}, dtype {args.dtype or dtype}")
    results = bench.run_bench(
        cases,
        accels,
        frames=args.frames,
        warmup=args.warmup,
        original=original,
        device=device,
        dtype=dtype,
        precisions=args.precision.split(","),
        compile_scopes=args.compile_scope.split(","),
    )
    print(bench.table(results))
    path = bench.write_report(results, device, Path(args.out))
    print(f"wrote {path} and {path.with_name('chart.png')}")
    return 1 if any(r.error for r in results) else 0


def _original_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("streamdiffusion") is not None


def cmd_run(args: argparse.Namespace) -> int:
    """Start the bridge: input, pipeline, outputs and the OSC server, until stopped."""
    from bridge.runtime.launch import run_bridge

    config = load_config(Path(args.config)) if args.config else {}
    settings = merge(config, {p.name: getattr(args, p.name, None) for p in SETTINGS})
    return run_bridge(settings, say=_say_in_cli_words)


def in_cli_words(sentence: str) -> str:
    """Turn the Python spelling of settings in a library message into flags: `accel="none"`
    becomes `--accel none`, `frame_buffer_size=2` becomes `--frame-buffer-size 2`."""

    def flag(match: re.Match[str]) -> str:
        key, value = match.group(1), match.group(3)
        if key not in SETTINGS_BY_KEY:
            return match.group(0)
        flag = key.replace("_", "-")
        if SETTINGS_BY_KEY[key].kind is Kind.BOOL and value in ("True", "False"):
            return f"--{flag}" if value == "True" else f"--no-{flag}"
        return f"--{flag} {value}".rstrip()

    return re.sub(r"\b([a-z][a-z_]*)=([\"']?)([^\"'\s,;()]*)\2", flag, sentence)


def _say_in_cli_words(line: str) -> None:
    print(in_cli_words(line), file=sys.stderr, flush=True)


def _setting_type(param: Param) -> Callable[[str], object]:
    """An argparse type that checks one value against the schema, so typos fail at once."""

    def convert(text: str) -> object:
        value: object = text
        if param.kind is Kind.INT:
            value = _number(text, int)
        elif param.kind is Kind.FLOAT:
            value = _number(text, float)
        elif param.kind is Kind.INT_LIST:
            parts = [part.strip() for part in text.split(",") if part.strip()]
            value = [_number(part, int) for part in parts]
        try:
            checked = param.validate(value)
        except ParamError:
            raise argparse.ArgumentTypeError(f"got {text!r}; use {param.allowed()}") from None
        return checked

    convert.__name__ = param.kind.value
    return convert


def _number(text: str, kind: type) -> object:
    try:
        return kind(text)
    except ValueError:
        return text


def _add_setting(group: argparse._ArgumentGroup, param: Param) -> None:
    described = setting_help(param)
    options: dict[str, Any] = {"dest": param.name, "default": None, "help": described.text}
    if param.kind is Kind.BOOL:
        options["action"] = argparse.BooleanOptionalAction
    elif param.kind is Kind.STRING_LIST:
        options.update(action="append", metavar=param.name.upper())
    elif param.kind is Kind.CHOICE:
        options["choices"] = param.choices
    else:
        options.update(type=_setting_type(param), metavar=_metavar(param))
    group.add_argument(*described.flags, **options)


def _metavar(param: Param) -> str:
    if param.kind is Kind.INT_LIST:
        return "I,J,..."
    return {Kind.INT: "N", Kind.FLOAT: "X"}.get(param.kind, param.name.upper())


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
    """Print the GPU, library versions, whether compile works, transports and cached models."""
    import importlib.metadata
    import platform

    import torch

    from bridge.accel.choice import compile_support, find_triton, try_compile
    from bridge.io import TransportError
    from bridge.io.ndi import runtime_version as ndi_runtime_version
    from bridge.models.hub import hf_hub_cache

    print(f"python       {platform.python_version()} on {platform.platform()}")
    for package in ("torch", "diffusers", "transformers", "xformers", "python-osc", "SpoutGL"):
        try:
            version = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            version = "not installed"
        print(f"{package:<13}{version}")
    try:
        ndi = f"runtime {ndi_runtime_version()} loaded"
    except TransportError as error:
        ndi = f"runtime not loaded: {error}"
    print(f"ndi          {ndi}")
    if torch.cuda.is_available():
        for index in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(index)
            memory = props.total_memory / 2**30
            print(f"gpu {index}        {props.name}, {memory:.0f} GiB, CUDA {torch.version.cuda}")
    else:
        print("gpu          none found by torch (CPU only: expect a few frames per second at most)")
    cuda = torch.cuda.is_available()
    triton = find_triton() if cuda else None
    usable, reason = compile_support(cuda, triton, torch.__version__, sys.platform)
    if usable:
        kernel_error = try_compile(torch.device("cuda"))
        usable, reason = compile_support(
            cuda, triton, torch.__version__, sys.platform, kernel_error
        )
    print(f"compile      {'yes' if usable else 'no'}: {reason}")
    cache = hf_hub_cache()
    models = sorted(p.name[len("models--") :].replace("--", "/") for p in cache.glob("models--*"))
    print(f"hf cache     {cache}: {', '.join(models) if models else 'no models'}")
    print()
    return cmd_list(args)


class _Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one sentence, not the whole usage text."""

    def error(self, message: str) -> typing.NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: {message}; see {self.prog} --help.\n")


def build_parser() -> argparse.ArgumentParser:
    """The command-line interface."""
    parser = _Parser(
        prog="sd-bridge",
        description="Live StreamDiffusion for VJ rigs: frames in, diffused frames out, OSC knobs.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser(
        "run",
        help="run the bridge",
        description="Run the bridge until Ctrl-C. Every setting is also a TOML key (--config) "
        "and the live ones an OSC address: see docs/settings.md.",
    )
    groups: dict[str, argparse._ArgumentGroup] = {}
    for param in sorted(SETTINGS, key=lambda p: GROUP_ORDER.index(p.group)):
        if param.group not in groups:
            groups[param.group] = run.add_argument_group(param.group)
        _add_setting(groups[param.group], param)
    run.add_argument(
        "--config", help="TOML file of settings by name, e.g. width = 768; the command line wins"
    )
    run.set_defaults(func=cmd_run)

    listing = sub.add_parser("list", help="transports and devices on this machine")
    listing.set_defaults(func=cmd_list)
    doctor = sub.add_parser(
        "doctor", help="GPU, versions, whether compile works, transports and cached models"
    )
    doctor.set_defaults(func=cmd_doctor)

    bench = sub.add_parser("bench", help="benchmark against the original StreamDiffusion")
    bench.add_argument("--cases", help="comma-separated case names (default: all for the device)")
    bench.add_argument("--accel", help="comma-separated modes: none, cudagraph, compile")
    bench.add_argument("--frames", type=int, default=200, help="timed frames per run")
    bench.add_argument("--warmup", type=int, default=20, help="untimed frames per run")
    bench.add_argument("--device", help="cuda, cuda:1, mps or cpu (default: the best there is)")
    bench.add_argument("--dtype", help="fp16, bf16 or fp32 (default: fp16 on GPU, fp32 on CPU)")
    bench.add_argument(
        "--precision",
        default="default",
        help="comma-separated UNet precisions of our runs: default, fp8 (default: default)",
    )
    bench.add_argument(
        "--compile-scope",
        default="model",
        help="comma-separated scopes of the compile runs: model, blocks (default: model)",
    )
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
        print(f"sd-bridge: {in_cli_words(str(error))}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("sd-bridge: stopped.", file=sys.stderr)
        return 130


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
