"""Would ahead-of-time packages start the bridge faster than torch.compile's warm cache?

A warm `--accel compile` start still spends most of its time in Dynamo re-tracing the UNet and
TAESD (docs/benchmarks.md, "Start-up"). An AOTInductor package (torch.export, then
`torch._inductor.aoti_compile_and_package`) is loaded without tracing. This script measures
that route on one model and size, without changing the bridge:

    python scripts/aot_probe.py build --model synthetic:sd-turbo --folder aot
    python scripts/aot_probe.py start --model synthetic:sd-turbo --folder aot --json start.json

`build` runs three frames eagerly, records the exact arguments of the first UNet, TAESD-encoder
and TAESD-decoder calls, exports each network with those arguments and compiles it into
`<folder>/<name>.pt2`. `start` (run it in a new process) loads the packages, puts them in place
of the three networks, captures the frame step as a CUDA graph on CUDA, and reports the time
of each phase from the script's first line (the interpreter's own start-up is not in it), the
time of the first three frames (graph capture included), the frame rate with frames launched
back to back, how often the packages ran, and the largest difference of the output against the
same pipeline run eagerly.

The packages hold no weights: each is built with `package_constants_in_so` off, and `start`
hands it the loaded model's own parameters as user-managed constants, so the package reads the
very tensors the model holds (no second copy, and a change made to them in place reaches it).

Only the plain pipeline is covered: no LoRA, ControlNet, IP-Adapter or feature bank (their
live tensors would be frozen into a package as constants unless made inputs).
"""

from __future__ import annotations

import time

STARTED = time.perf_counter()

import argparse  # noqa: E402
import faulthandler  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

from bridge.accel import GraphedFrameStep  # noqa: E402
from bridge.models import load_components  # noqa: E402
from bridge.stream import StreamConfig, StreamDiffusion  # noqa: E402

IMPORTED = time.perf_counter()
NETWORKS = ("unet", "encoder", "decoder")


def build_stream(args, device: torch.device) -> StreamDiffusion:
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    components = load_components(args.model, vae="tiny", device=device, dtype=dtype)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        components.unet.to(memory_format=torch.channels_last)
        components.vae.to(memory_format=torch.channels_last)
    config = StreamConfig(
        width=args.size, height=args.size, t_index_list=(32,), cfg_type="none", seed=1
    )
    return StreamDiffusion(components, config, prompt="a fox in the snow")


def modules(stream: StreamDiffusion) -> dict[str, torch.nn.Module]:
    return {"unet": stream.unet, "encoder": stream.vae.encoder, "decoder": stream.vae.decoder}


def frame(args, device: torch.device) -> torch.Tensor:
    generator = torch.Generator().manual_seed(3)
    pixels = torch.randint(0, 256, (1, args.size, args.size, 3), generator=generator)
    return pixels.to(torch.uint8).to(device)


def record_calls(stream: StreamDiffusion, pixels: torch.Tensor) -> dict[str, tuple]:
    """The positional and keyword arguments of each network's first call in a frame."""
    calls: dict[str, tuple] = {}
    handles = []
    for name, module in modules(stream).items():

        def hook(module, args, kwargs, name=name):
            calls.setdefault(name, (args, kwargs))

        handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))
    for _ in range(3):
        stream.img2img(pixels)
    for handle in handles:
        handle.remove()
    return calls


def build(args, device: torch.device) -> dict:
    from torch._inductor import aoti_compile_and_package

    report: dict = {}
    stream = build_stream(args, device)
    calls = record_calls(stream, frame(args, device))
    folder = Path(args.folder)
    folder.mkdir(parents=True, exist_ok=True)
    for name, module in modules(stream).items():
        if name not in args.networks:
            continue
        positional, keywords = calls[name]
        started = time.perf_counter()
        with torch.no_grad():
            exported = torch.export.export(module, positional, kwargs=keywords, strict=False)
        report[f"{name}_export_s"] = time.perf_counter() - started
        started = time.perf_counter()
        aoti_compile_and_package(
            exported,
            package_path=str(folder / f"{name}.pt2"),
            inductor_configs={"aot_inductor.package_constants_in_so": False},
        )
        report[f"{name}_compile_s"] = time.perf_counter() - started
        (folder / f"{name}.keys.json").write_text(json.dumps(sorted(keywords)))
        print(name, {k: round(v, 2) for k, v in report.items() if k.startswith(name)}, flush=True)
    return report


class Packaged(torch.nn.Module):
    """A loaded package in place of a network: called as the network is, keywords included."""

    def __init__(self, runner, keys: list[str], original: torch.nn.Module) -> None:
        super().__init__()
        self.runner = runner
        self.keys = keys
        self.calls = 0
        self.config = getattr(original, "config", None)
        like = next(original.parameters())
        # An empty parameter, so that the VAE around it still finds its dtype and device.
        self.anchor = torch.nn.Parameter(like.new_empty(0), requires_grad=False)

    def use_weights_of(self, original: torch.nn.Module) -> int:
        """Hand the package the network's own tensors; returns how many it took."""
        tensors = dict(original.named_parameters())
        tensors.update(original.named_buffers())
        wanted = self.runner.get_constant_fqns()
        missing = sorted(set(wanted) - set(tensors))
        if missing:
            raise ValueError(f"the network has no tensors named {missing[:5]}.")
        chosen = {name: tensors[name].detach() for name in wanted}
        self.runner.load_constants(chosen, check_full_update=True, user_managed=True)
        return len(chosen)

    def forward(self, *args, **kwargs):
        self.calls += 1
        self.last_call = (args, kwargs)
        unknown = sorted(set(kwargs) - set(self.keys))
        if unknown:
            raise ValueError(f"the package was exported without the arguments {unknown}.")
        return self.runner(*args, **{key: kwargs[key] for key in self.keys if key in kwargs})


def reaches_in_place_change(packaged: Packaged, original: torch.nn.Module) -> bool:
    """Does halving one of the network's weights in place change the package's output?"""
    args, kwargs = packaged.last_call
    weight = next(original.parameters())
    with torch.inference_mode():
        before = packaged(*args, **kwargs)[0].clone()
        weight.mul_(0.5)
        after = packaged(*args, **kwargs)[0].clone()
        weight.mul_(2.0)
    return not torch.equal(before, after)


def start(args, device: torch.device) -> dict:
    from torch._inductor import aoti_load_package

    report: dict = {"import_s": IMPORTED - STARTED}
    loaded: list[Packaged] = []
    started = time.perf_counter()
    stream = build_stream(args, device)
    report["load_model_s"] = time.perf_counter() - started
    say("model loaded", started)
    eager = modules(stream)
    folder = Path(args.folder)
    started = time.perf_counter()
    for name in args.networks:
        keys = json.loads((folder / f"{name}.keys.json").read_text())
        runner = aoti_load_package(str(folder / f"{name}.pt2"), run_single_threaded=args.graph)
        packaged = Packaged(runner, keys, eager[name])
        report[f"{name}_constants"] = packaged.use_weights_of(eager[name])
        say(f"loaded {name}", started)
        if name == "unet":
            stream.unet = packaged
        else:
            setattr(stream.vae, name, packaged)
        loaded.append(packaged)
    report["load_packages_s"] = time.perf_counter() - started
    pixels = frame(args, device)
    started = time.perf_counter()
    if device.type == "cuda":
        with torch.inference_mode():
            stream.img2img(pixels)
            torch.cuda.synchronize()
        say("one frame through the packages, uncaptured", started)
    if device.type == "cuda" and args.graph:
        stream.accelerator = GraphedFrameStep(stream)
    started = time.perf_counter()
    with torch.inference_mode():
        outputs = [stream.img2img(pixels).clone() for _ in range(3)]
        if device.type == "cuda":
            torch.cuda.synchronize()
        report["first_three_frames_s"] = time.perf_counter() - started
        report["since_script_start_s"] = time.perf_counter() - STARTED
        say("three frames", started)
        started = time.perf_counter()
        for _ in range(args.frames):
            stream.img2img(pixels)
        if device.type == "cuda":
            torch.cuda.synchronize()
        report["fps_back_to_back"] = args.frames / (time.perf_counter() - started)
        # The same pipeline run eagerly, from the same seed, on the same frames.
        reference = build_stream(args, device)
        expected = [reference.img2img(pixels).clone() for _ in range(3)]
    # Each package must have run, or equal outputs would prove nothing.
    report["fewest_package_calls"] = min(packaged.calls for packaged in loaded)
    if report["fewest_package_calls"] == 0:
        raise RuntimeError("a package never ran: the pipeline does not call it where expected.")
    report["max_abs_vs_eager"] = max(
        (a.int() - b.int()).abs().max().item() for a, b in zip(outputs, expected, strict=True)
    )
    first = args.networks[0]
    reached = reaches_in_place_change(loaded[0], eager[first])
    report[f"in_place_change_reached_{first}"] = int(reached)
    return report


def say(what: str, since: float) -> None:
    """One progress line, so a run that dies shows how far it got."""
    now = time.perf_counter()
    print(f"[{now - STARTED:7.2f} s] {what} ({now - since:.2f} s)", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("action", choices=("build", "start"))
    parser.add_argument("--model", default="synthetic:sd-turbo")
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--folder", default="aot")
    parser.add_argument("--frames", type=int, default=300)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", help="write the report here")
    parser.add_argument(
        "--networks",
        type=lambda text: [name for name in text.split(",") if name],
        default=list(NETWORKS),
        help=f"which networks to package, comma-separated, of {','.join(NETWORKS)}",
    )
    parser.add_argument(
        "--no-graph",
        dest="graph",
        action="store_false",
        help="run the packages without capturing the frame step in a CUDA graph",
    )
    args = parser.parse_args(argv)
    faulthandler.enable()
    device = torch.device(args.device)
    report = build(args, device) if args.action == "build" else start(args, device)
    report = {key: round(value, 3) for key, value in report.items()}
    print(json.dumps(report, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
