"""Flicker against speed: the feature bank and latent feedback, each off and on, in one run.

A slowly panning picture (a smooth random texture moving `--pan` pixels a frame) goes through
one pipeline under each setting in turn, on the same model. For each the script reports:

- `output_change`: the mean absolute change of the output from one frame to the next, in 0-255
  levels, beside `input_change`, the same for the input. The motion itself accounts for some
  change; what the output adds on top of it is flicker, so lower is steadier;
- `fps` over the measured frames, each frame waited for as a live stream must, and `fps_cost`,
  the fraction of the fps without either feature that a setting loses;
- `peak_memory_mib`, the most GPU memory allocated during the setting (CUDA only).

Synthetic weights are random. The see-through weights of the synthetic models carry the picture
around the self-attention layers (bridge/models/passthrough.py), so with them the bank shows in
speed and memory but cannot change the picture; `--random-unet` swaps in a UNet of plain random
weights (same architecture, same speed) whose output does depend on self-attention. Either way
the numbers show the mechanism, not the picture quality of real weights.

    python scripts/temporal_bench.py --out results/temporal
    python scripts/temporal_bench.py --model synthetic:sd-turbo --accel cudagraph --out results/t
    python scripts/temporal_bench.py --model synthetic:sd-turbo --accel compile --out results/t

`temporal.json` in `--out` holds every number and the settings that produced them.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "a watercolour landscape, soft light"
OFF = {"feature_bank_size": 0, "latent_feedback": 0.0}
CASES = {
    "off": {},
    "feedback": {"latent_feedback": 0.3},
    "bank1": {"feature_bank_size": 1},
    "bank4": {"feature_bank_size": 4},
}
"""Settings of each measured case, on top of both features off (strength and threshold stay at
their defaults, 0.8 and 0.98). Cases that change the UNet come last, so that under torch.compile
the cases without a bank share one compiled UNet."""


def panning(count: int, height: int, width: int, pan: int, device: str) -> torch.Tensor:
    """`count` uint8 (H, W, 3) frames of a smooth texture moving left `pan` pixels a frame."""
    generator = torch.Generator().manual_seed(7)
    span = width + pan * count
    texture = torch.zeros((1, 3, height, span))
    for cell, weight in ((64, 0.6), (16, 0.3), (4, 0.1)):
        coarse = torch.rand((1, 3, height // cell + 2, span // cell + 2), generator=generator)
        fine = F.interpolate(coarse, size=(height + 2 * cell, span + 2 * cell), mode="bicubic")
        texture += weight * fine[:, :, cell : cell + height, cell : cell + span]
    pictures = (texture[0].clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0)
    frames = [pictures[:, index * pan : index * pan + width] for index in range(count)]
    return torch.stack(frames).contiguous().to(device)


def mean_change(frames: torch.Tensor) -> float:
    """Mean absolute difference between consecutive frames, in 0-255 levels."""
    steps = frames[1:].float() - frames[:-1].float()
    return steps.abs().mean().item()


def load(args: argparse.Namespace, device: str, dtype: torch.dtype):
    from bridge.models import load_components

    components = load_components(
        args.model, vae="tiny", device=device, dtype=dtype, cache_dir=args.cache_dir
    )
    if args.random_unet:
        from diffusers import UNet2DConditionModel

        torch.manual_seed(0)
        unet = UNet2DConditionModel.from_config(components.unet.config)
        unet = unet.to(device, dtype).eval().requires_grad_(False)
        components = dataclasses.replace(components, unet=unet)
    return components


def measure(stream, frames: torch.Tensor, warmup: int, device: str) -> dict:
    """Run the frames through `stream`; time and keep the ones after `warmup`."""
    measured = frames.shape[0] - warmup
    outputs = torch.empty_like(frames[warmup:])
    for index in range(warmup):
        stream(frames[index])
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for index in range(measured):
        outputs[index].copy_(stream(frames[warmup + index]))
        if device == "cuda":
            torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    return {
        "fps": measured / elapsed,
        "frame_ms": 1000 * elapsed / measured,
        "input_change": mean_change(frames[warmup:]),
        "output_change": mean_change(outputs),
    }


def run(args: argparse.Namespace) -> dict:
    from bridge.accel import accelerate
    from bridge.stream import StreamConfig, StreamDiffusion

    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    accel = args.accel if args.accel != "auto" else ("cudagraph" if device == "cuda" else "none")
    dtype = torch.float16 if device == "cuda" else torch.float32
    components = load(args, device, dtype)
    config = StreamConfig(
        width=args.size, height=args.size, t_index_list=tuple(args.t_index), cfg_type=args.cfg
    )
    stream = accelerate(StreamDiffusion(components, config, prompt=PROMPT), accel)
    frames = panning(args.warmup + args.frames, args.size, args.size, args.pan, device)
    cases = {}
    for name, settings in CASES.items():
        stream.update(**{**OFF, **settings})
        stream.reset()
        if device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        result = measure(stream, frames, args.warmup, device)
        result["settings"] = settings
        result["peak_memory_mib"] = (
            torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else None
        )
        cases[name] = result
        print(
            f"{name:9s} {result['fps']:8.1f} fps  output change {result['output_change']:6.2f}"
            f"  (input {result['input_change']:.2f})",
            flush=True,
        )
    baseline = cases["off"]["fps"]
    for result in cases.values():
        result["fps_cost"] = 1.0 - result["fps"] / baseline
    return {
        "model": args.model,
        "random_unet": args.random_unet,
        "device": torch.cuda.get_device_name() if device == "cuda" else f"cpu {platform.machine()}",
        "accel": accel,
        "dtype": str(dtype).removeprefix("torch."),
        "size": args.size,
        "t_index_list": list(args.t_index),
        "cfg_type": args.cfg,
        "pan_pixels_per_frame": args.pan,
        "warmup_frames": args.warmup,
        "measured_frames": args.frames,
        "torch": torch.__version__,
        "cases": cases,
    }


def main(argv: list[str] | None = None) -> int:
    """Parse the arguments, run every case and write `temporal.json`; return the exit status."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for temporal.json")
    parser.add_argument("--model", default="synthetic:tiny")
    parser.add_argument("--device", default="auto", help="cuda, cpu or auto")
    parser.add_argument("--accel", default="auto", choices=("auto", "none", "cudagraph", "compile"))
    parser.add_argument("--size", type=int, default=None, help="width and height (default 512)")
    parser.add_argument("--t-index", type=int, nargs="+", default=[32])
    parser.add_argument("--cfg", default="none", choices=("none", "full", "self", "initialize"))
    parser.add_argument("--pan", type=int, default=4, help="pixels the input moves a frame")
    parser.add_argument("--frames", type=int, default=None, help="measured frames per case")
    parser.add_argument("--warmup", type=int, default=None, help="frames before measuring")
    parser.add_argument("--random-unet", action="store_true", help="UNet of plain random weights")
    parser.add_argument("--cache-dir", type=Path, default=None, help="where models are built")
    args = parser.parse_args(argv)
    tiny = args.model == "synthetic:tiny"
    args.size = args.size or (64 if tiny else 512)
    args.frames = args.frames or (12 if tiny else 200)
    args.warmup = args.warmup if args.warmup is not None else (3 if tiny else 10)
    if args.frames < 2:
        parser.error(f"--frames must be at least 2 to measure a change, got {args.frames}.")
    sys.path.insert(0, str(ROOT))
    report = run(args)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "temporal.json"
    path.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
