"""End-to-end figures of a real `sd-bridge run`: shm in, shm out, OSC while it runs.

Starts the bridge as its own process reading `shm:<in>` and writing `shm:<out>`, publishes
frames into the input as fast as the bridge takes them, and reads the output, measuring:

- output fps, and capture-to-output latency (the capture time travels inside the protocol);
- the same while a prompt change is sent over OSC before every frame, to show that prompt
  encoding stays off the frame path (frame-interval p50/p99 in both phases).

    python scripts/e2e_bench.py --model synthetic:sd-turbo --accel compile --t-index 32 \
        --cfg none --seconds 10 --json e2e.json
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

from bridge.control import OscClient
from bridge.io.shm_protocol import ShmError, ShmReader, ShmWriter


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * (len(ordered) - 1)))]


def measure(reader: ShmReader, writer: ShmWriter, frames: np.ndarray, seconds: float, on_frame):
    """Feed and read for `seconds`; return output arrival times and latencies."""
    arrivals, latencies = [], []
    end = time.perf_counter() + seconds
    index = 0
    while time.perf_counter() < end:
        writer.write(frames[index % len(frames)], capture_time=time.perf_counter())
        index += 1
        got = reader.read()
        if got is not None:
            arrived = time.perf_counter()
            arrivals.append(arrived)
            latencies.append(arrived - got[1].capture_time)
            on_frame(len(arrivals))
        else:
            time.sleep(0.0002)
    return arrivals, latencies


def summary(arrivals: list[float], latencies: list[float]) -> dict:
    intervals = [b - a for a, b in zip(arrivals, arrivals[1:], strict=False)]
    return {
        "frames": len(arrivals),
        "fps": (len(arrivals) - 1) / (arrivals[-1] - arrivals[0]) if len(arrivals) > 1 else 0.0,
        "interval_p50_ms": statistics.median(intervals) * 1000 if intervals else 0.0,
        "interval_p99_ms": percentile(intervals, 0.99) * 1000 if intervals else 0.0,
        "latency_p50_ms": statistics.median(latencies) * 1000 if latencies else 0.0,
        "latency_p99_ms": percentile(latencies, 0.99) * 1000 if latencies else 0.0,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="synthetic:sd-turbo")
    parser.add_argument("--accel", default="compile")
    parser.add_argument("--t-index", default="32")
    parser.add_argument("--cfg", default="none")
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--osc-port", type=int, default=7411)
    parser.add_argument("--json", help="write the figures here")
    args = parser.parse_args()

    name_in, name_out = f"e2ei{os.getpid()}", f"e2eo{os.getpid()}"
    size = args.size
    writer = ShmWriter(name_in, size, size, "rgba")
    frames = np.random.default_rng(0).integers(0, 256, (8, size, size, 4), dtype=np.uint8)
    command = [
        sys.executable,
        "-m",
        "bridge.cli",
        "run",
        "--model",
        args.model,
        "--width",
        str(size),
        "--height",
        str(size),
        "--t-index",
        args.t_index,
        "--cfg",
        args.cfg,
        "--accel",
        args.accel,
        "--input",
        f"shm:{name_in}",
        "--output",
        f"shm:{name_out}",
        "--osc-port",
        str(args.osc_port),
        "--quiet",
    ]
    started = time.perf_counter()
    bridge = subprocess.Popen(command)
    results: dict = {"command": " ".join(command[1:])}
    try:
        reader = None
        while reader is None:
            writer.write(frames[0], capture_time=time.perf_counter())
            if bridge.poll() is not None:
                raise SystemExit(f"the bridge exited with {bridge.returncode}")
            try:
                reader = ShmReader(name_out)
            except ShmError:
                time.sleep(0.05)
        while reader.read() is None:
            writer.write(frames[0], capture_time=time.perf_counter())
            time.sleep(0.001)
        results["first_frame_s"] = time.perf_counter() - started
        measure(reader, writer, frames, 3.0, lambda n: None)  # settle
        results["steady"] = summary(*measure(reader, writer, frames, args.seconds, lambda n: None))
        with OscClient("127.0.0.1", args.osc_port) as client:

            def change_prompt(count: int) -> None:
                client.send("/sd/prompt", f"a painting of a city, variation {count}")

            churn = measure(reader, writer, frames, args.seconds, change_prompt)
            results["prompt_every_frame"] = summary(*churn)
        reader.close()
    finally:
        bridge.terminate()
        bridge.wait(10)
        writer.close()
    print(json.dumps(results, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
