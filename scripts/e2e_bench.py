"""End-to-end figures of a real `sd-bridge run`: shm in, shm out, OSC while it runs.

Starts the bridge as its own process reading `shm:<in>` and writing `shm:<out>`. A writer process
publishes frames into the input, paced at each rate of `--input-fps` in turn (0: as fast as it
can), each stamped with the moment it was written; this process reads the output and measures,
for each rate, after `--settle` seconds:

- output fps and frame interval p50/p99;
- capture-to-output latency p50/p99: the capture time travels inside the protocol, from the
  writer through the bridge to its output, so this is every hop: shm in, the engine, the GPU,
  shm out, and this reader (which looks every tenth of a millisecond);
- the bridge's own figures from its status line: its step time (the GPU time a step takes,
  launch included when the GPU was idle) and its fps and latency.

Then, unless `--no-prompt-churn`, the last rate again with a prompt change sent over OSC before
every output frame, to show that prompt encoding stays off the frame path. Options this script
does not know go to `sd-bridge run`.

    python scripts/e2e_bench.py --model synthetic:sd-turbo --accel compile --t-index 32 \\
        --cfg none --input-fps 30,60,0 --seconds 10 --json e2e.json
    python scripts/e2e_bench.py --model synthetic:tiny --accel none --size 64 \\
        --input-fps 30,0 --seconds 1 --settle 0.5 --no-prompt-churn     # a CPU smoke run
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import os
import re
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from bridge.control import OscClient
from bridge.io.shm_protocol import ShmReader, ShmWriter, clock

# How often this reader looks at the output: its own share of the measured latency is half of
# this plus the oversleep of one sleep.
READ_POLL = 0.0001
# An unpaced writer still sleeps this long between frames: near a thousand frames a second,
# far more than any pipeline takes, without a core spent copying frames nobody reads. A frame
# is about half of this old, on average, when the bridge takes it.
UNPACED_GAP = 0.001
STATUS_LINE = re.compile(
    r"([\d.]+) fps \| latency\s+([\d.]+) ms \(p99 ([\d.]+)\) \| step\s+([\d.]+) ms"
)


def feed(name: str, size: int, rate, stop, written) -> None:
    """Publish RGBA noise under `name` at `rate.value` fps (0: unpaced) until `stop` is set.

    Runs in its own process, so the writer never shares an interpreter lock with the reader.
    Each frame is stamped with the moment it is written; a paced writer keeps a grid of ticks
    and skips ticks it is late for rather than bursting.
    """
    frames = np.random.default_rng(0).integers(0, 256, (8, size, size, 4), dtype=np.uint8)
    with ShmWriter(name, size, size, "rgba") as writer:
        fps, first, tick = None, 0.0, 0
        while not stop.is_set():
            if rate.value != fps:
                fps, first, tick = rate.value, clock(), 0
            if fps > 0:
                due = first + tick / fps
                if clock() < due:
                    time.sleep(min(due - clock(), 0.05))
                    continue
            writer.write(frames[written.value % len(frames)], capture_time=clock())
            written.value += 1
            if fps > 0:
                tick = max(tick + 1, math.ceil((clock() - first) * fps))
            else:
                time.sleep(UNPACED_GAP)


class Writer:
    """The writer process and the rate it writes at."""

    def __init__(self, name: str, size: int, fps: float) -> None:
        context = multiprocessing.get_context("spawn")  # portable: no fork
        self.rate = context.RawValue("d", fps)
        self.written = context.RawValue("q", 0)
        self._stop = context.Event()
        self._process = context.Process(
            target=feed, args=(name, size, self.rate, self._stop, self.written), daemon=True
        )
        self._process.start()

    def close(self) -> None:
        """End the writer; it closes its stream."""
        self._stop.set()
        self._process.join(10)
        if self._process.is_alive():
            self._process.kill()


class StatusLog:
    """The bridge's standard error, read on a thread: its status lines, kept with their time."""

    def __init__(self, stream) -> None:
        self.lines: list[str] = []
        self.status: list[tuple[float, dict]] = []
        self._thread = threading.Thread(target=self._read, args=(stream,), daemon=True)
        self._thread.start()

    def _read(self, stream) -> None:
        for line in stream:
            self.lines.append(line.rstrip())
            found = STATUS_LINE.search(line)
            if found:
                fps, latency, latency_p99, step = (float(value) for value in found.groups())
                figures = {"fps": fps, "latency_ms": latency, "step_ms": step}
                self.status.append((clock(), figures | {"latency_p99_ms": latency_p99}))

    def between(self, start: float, end: float) -> list[dict]:
        """Status reports printed from `start` to `end`."""
        return [figures for at, figures in list(self.status) if start <= at <= end]


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * (len(ordered) - 1)))]


class Output:
    """Reads the bridge's output and keeps what arrived since the last `take`."""

    def __init__(self, reader: ShmReader) -> None:
        self.reader = reader
        self.newest_capture = -math.inf
        self.arrivals: list[float] = []
        self.latencies: list[float] = []
        self.held = 0

    def read_for(self, seconds: float, on_frame: Callable[[int], None] | None = None) -> None:
        """Read output frames for `seconds`; a frame not newer than the last is a held one."""
        end = clock() + seconds
        while clock() < end:
            got = self.reader.read()
            if got is None:
                time.sleep(READ_POLL)
                continue
            arrived = clock()
            capture = got[1].capture_time
            if capture <= self.newest_capture:
                self.held += 1
                continue
            self.newest_capture = capture
            self.arrivals.append(arrived)
            self.latencies.append(arrived - capture)
            if on_frame is not None:
                on_frame(len(self.arrivals))

    def take(self) -> tuple[list[float], list[float], int]:
        """What arrived since the last call: arrival times, latencies, held frames."""
        taken = self.arrivals, self.latencies, self.held
        self.arrivals, self.latencies, self.held = [], [], 0
        return taken


def summary(arrivals: list[float], latencies: list[float]) -> dict:
    intervals = [b - a for a, b in zip(arrivals, arrivals[1:], strict=False)]
    return {
        "frames": len(arrivals),
        "fps": (len(arrivals) - 1) / (arrivals[-1] - arrivals[0]) if len(arrivals) > 1 else 0.0,
        "interval_p50_ms": statistics.median(intervals) * 1000 if intervals else None,
        "interval_p99_ms": percentile(intervals, 0.99) * 1000 if intervals else None,
        "latency_p50_ms": statistics.median(latencies) * 1000 if latencies else None,
        "latency_p99_ms": percentile(latencies, 0.99) * 1000 if latencies else None,
    }


def bridge_figures(reports: list[dict]) -> dict:
    """The bridge's own figures at the end of a phase: its last status report.

    The bridge reports medians over its last 240 frames; by the end of a phase of the default
    length (13 s with the settling) those are all frames of the phase at 30 fps and more.
    """
    last = reports[-1] if reports else {}
    return {f"bridge_{name}": last.get(name) for name in ("step_ms", "fps", "latency_ms")}


def goals(phase: dict, pipeline_fps: float | None) -> dict:
    """Which latency goals a phase meets, measured against the bridge's own step time.

    Paced input: p50 within a step plus 3 ms, p99 within twice that. Unpaced: p50 within two
    steps and, when the pipeline's own rate is given, at least 95% of it.
    """
    step, p50, p99 = phase["bridge_step_ms"], phase["latency_p50_ms"], phase["latency_p99_ms"]
    if step is None or p50 is None:
        return {}
    if phase["input_fps"] > 0:
        return {
            "p50_within_step_plus_3ms": p50 <= step + 3,
            "p99_within_twice": p99 <= 2 * (step + 3),
        }
    met = {"p50_within_two_steps": p50 <= 2 * step}
    if pipeline_fps:
        met["fps_at_least_95_percent_of_pipeline"] = phase["fps"] >= 0.95 * pipeline_fps
    return met


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def rates(text: str) -> list[float]:
    """`30,60,0` as numbers; 0 is an unpaced writer."""
    try:
        values = [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a list of rates, e.g. 30,60,0") from None
    if not values or any(value < 0 for value in values):
        raise argparse.ArgumentTypeError(f"{text!r} needs rates of 0 or more, e.g. 30,60,0")
    return values


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="synthetic:sd-turbo")
    parser.add_argument("--accel", default="compile")
    parser.add_argument("--t-index", default="32")
    parser.add_argument("--cfg", default="none")
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument(
        "--input-fps",
        type=rates,
        default=[30.0, 60.0, 0.0],
        help="rates the writer publishes at, one phase each; 0: unpaced",
    )
    parser.add_argument("--seconds", type=float, default=10.0, help="measured per phase")
    parser.add_argument("--settle", type=float, default=3.0, help="unmeasured, before a phase")
    parser.add_argument("--no-prompt-churn", action="store_true")
    parser.add_argument("--pipeline-fps", type=float, help="the pipeline's own rate, to compare")
    parser.add_argument("--start-timeout", type=float, default=900.0)
    parser.add_argument("--osc-port", type=int, default=0, help="0: a free one")
    parser.add_argument("--json", help="write the figures here")
    args, bridge_args = parser.parse_known_args()

    name_in, name_out = f"e2ei{os.getpid()}", f"e2eo{os.getpid()}"
    osc_port = args.osc_port or free_udp_port()
    size = str(args.size)
    command = [
        sys.executable, "-m", "bridge.cli", "run", "--model", args.model, "--width", size,
        "--height", size, "--t-index", args.t_index, "--cfg", args.cfg, "--accel", args.accel,
        "--input", f"shm:{name_in}", "--output", f"shm:{name_out}",
        "--osc-port", str(osc_port), *bridge_args,
    ]  # fmt: skip
    writer = Writer(name_in, args.size, args.input_fps[0])
    started = clock()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    bridge = subprocess.Popen(
        command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env
    )
    log = StatusLog(bridge.stderr)
    results: dict = {"command": " ".join(command[1:]), "first_frame_s": None, "phases": []}
    try:
        output = Output(ShmReader(name_out))
        while output.reader.read() is None:
            if bridge.poll() is not None:
                tail = "\n".join(log.lines[-10:])
                raise SystemExit(f"the bridge exited with {bridge.returncode}:\n{tail}")
            if clock() - started > args.start_timeout:
                raise SystemExit(f"no output frame in {args.start_timeout:.0f} s")
            time.sleep(0.01)
        results["first_frame_s"] = round(clock() - started, 2)

        def phase(fps: float, on_frame=None, **extra) -> None:
            writer.rate.value = fps
            output.read_for(args.settle)
            output.take()
            written, begin = writer.written.value, clock()
            output.read_for(args.seconds, on_frame)
            end = clock()
            arrivals, latencies, held = output.take()
            figures = {"input_fps": fps, **extra, "input_frames": writer.written.value - written}
            figures |= summary(arrivals, latencies) | {"held_frames": held}
            figures |= bridge_figures(log.between(begin, end))
            figures["goals"] = goals(figures, args.pipeline_fps)
            results["phases"].append(figures)

        for fps in args.input_fps:
            phase(fps)
        if not args.no_prompt_churn:
            with OscClient("127.0.0.1", osc_port) as client:

                def change_prompt(count: int) -> None:
                    client.send("/sd/prompt", f"a painting of a city, variation {count}")

                phase(args.input_fps[-1], change_prompt, prompt_every_frame=True)
        output.reader.close()
    finally:
        bridge.terminate()
        try:
            bridge.wait(30)
        except subprocess.TimeoutExpired:
            bridge.kill()
            bridge.wait()
        writer.close()
    print(json.dumps(results, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
