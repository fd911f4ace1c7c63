"""Latency through NDI: from a frame's capture to its receipt, as p50 and p99 per frame size.

A sender process publishes frames through the bridge's NDI sink (`ndi:<name>`, clocked at
`--fps`); this process receives them through the bridge's NDI source, which takes each frame's
capture time from the metadata the sink wrote. Both run on this machine, so the capture time is
exact and the connection is loopback: the numbers are SpeedHQ encode, the NDI clock, transport,
decode and the copy into a frame, without a network.

    python scripts/ndi_latency.py
    python scripts/ndi_latency.py --sizes 512x512,1280x720,1920x1080 --frames 600 --fps 60

Frames are a gradient that moves every frame, so no frame repeats the one before.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bridge.io import Frame, now, open_sink, open_source  # noqa: E402


def moving_gradient(index: int, width: int, height: int) -> np.ndarray:
    """An RGB frame whose gradient shifts by `index` pixels."""
    columns = (np.arange(width) + index * 4) % 256
    rows = np.arange(height) % 256
    pixels = np.empty((height, width, 3), np.uint8)
    pixels[..., 0] = columns[None, :]
    pixels[..., 1] = rows[:, None]
    pixels[..., 2] = index % 256
    return pixels


def run_sender(name: str, width: int, height: int, fps: float, seconds: float) -> None:
    """Publish frames as `ndi:<name>` for `seconds`, each stamped when it is made."""
    with open_sink(f"ndi:{name}", width=width, height=height, fps=fps) as sink:
        print("ready", flush=True)
        end = time.monotonic() + seconds
        index = 0
        while time.monotonic() < end:
            pixels = moving_gradient(index, width, height)
            sink.write(Frame(pixels, "rgb", now(), index))  # clocked: waits for its turn
            index += 1


def measure(width: int, height: int, frames: int, fps: float, warmup: int) -> dict:
    """Capture-to-receipt latencies of `frames` frames at one size, after `warmup` frames."""
    name = f"sd-latency-{os.getpid()}-{width}x{height}"
    seconds = (frames + warmup) / fps * 3 + 10  # room for a machine slower than `fps`
    sender = subprocess.Popen(
        [sys.executable, __file__, "--sender", name, f"{width}x{height}", str(fps), str(seconds)],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        if sender.stdout.readline().strip() != "ready":
            raise SystemExit("the sender process did not start")
        latencies: list[float] = []
        deadline = time.monotonic() + seconds
        with open_source(f"ndi:{name}", width=width, height=height) as source:
            while len(latencies) < frames + warmup and time.monotonic() < deadline:
                frame = source.read(timeout=0.5)
                if frame is None:
                    continue
                latencies.append(now() - frame.capture_time)
    finally:
        sender.kill()
        sender.communicate()
    measured = sorted(latencies[warmup:])
    if len(measured) < frames:
        raise SystemExit(f"only {len(measured)} of {frames} frames arrived at {width}x{height}")
    quantiles = statistics.quantiles(measured, n=100, method="inclusive")
    return {
        "size": f"{width}x{height}",
        "frames": len(measured),
        "fps": fps,
        "p50_ms": round(quantiles[49] * 1000, 2),
        "p99_ms": round(quantiles[98] * 1000, 2),
        "max_ms": round(measured[-1] * 1000, 2),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="512x512,1280x720", help="comma-separated WxH")
    parser.add_argument("--frames", type=int, default=300, help="measured frames per size")
    parser.add_argument("--warmup", type=int, default=30, help="frames left out at the start")
    parser.add_argument("--fps", type=float, default=30.0, help="the sink's announced rate")
    parser.add_argument("--json", help="also write the results to this file")
    parser.add_argument("--sender", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.sender:
        name, size, fps, seconds = args.sender
        width, height = map(int, size.split("x"))
        run_sender(name, width, height, float(fps), float(seconds))
        return 0
    results = []
    print("| size | frames | sink fps | p50 ms | p99 ms | max ms |")
    print("|---|---|---|---|---|---|")
    for size in args.sizes.split(","):
        width, height = map(int, size.split("x"))
        result = measure(width, height, args.frames, args.fps, args.warmup)
        results.append(result)
        print(
            f"| {result['size']} | {result['frames']} | {result['fps']:g} | {result['p50_ms']} "
            f"| {result['p99_ms']} | {result['max_ms']} |",
            flush=True,
        )
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
