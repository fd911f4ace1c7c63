"""Soak a running bridge: minutes of OSC churn and input flaps, then check that it held up.

Starts `python -m bridge.cli run` reading `shm:<in>` and writing `shm:<out>`, and until the time
is up:

- sends a few OSC messages a second to every parameter: mostly valid values drawn from the
  schema in `bridge.control.params`, some invalid ones, each of which must be refused with
  `/sd/error`;
- feeds the input from a writer process that it kills (SIGKILL) and restarts every few seconds,
  so the bridge loses its source and has to pick it up again;
- reads the output all along.

It measures after a warm-up (10% of the run, at least 10 s, counted from the first output frame)
and at the end: frames, fps, drops and skips, OSC errors, whether `/sd/get` still answers with
the values sent, the bridge's RSS, threads and GPU memory. Then it stops the bridge with SIGTERM.
The exit code is 0 when every target holds: no crash, still answering, frames after every flap,
every invalid message refused and no other error, RSS growth from warm-up to end under 2%.

    python scripts/soak.py --minutes 3
    python scripts/soak.py --minutes 10 --json soak.json --width 512 --height 512 \\
        --model synthetic:sd-turbo --accel compile

Options the soak does not know go to `sd-bridge run` (default `--model synthetic:tiny`).
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import os
import random
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from bridge.control import OscClient
from bridge.control.client import ArgValue
from bridge.control.params import MAX_T_INDICES, PARAMS, Kind, Param
from bridge.io.shm_protocol import ShmError, ShmReader, ShmWriter, clock

if TYPE_CHECKING:
    from ctypes import c_double

WARMUP_FRACTION = 0.1
MIN_WARMUP_S = 10.0
CALM_FRACTION = 0.15  # no flaps in the last part of the run, so the last one can recover
MIN_CALM_S = 10.0
RSS_EVERY_S = 5.0
REPLY_TIMEOUT_S = 5.0
STOP_TIMEOUT_S = 15.0
MAX_STOP_S = 2.0  # the bridge's promise: SIGTERM to exit within two seconds
UNKNOWN_ADDRESSES = ("/sd/nope", "/sd/Prompt", "/sd/filter", "/", "/sd/t_index/0")
WORD_CHARACTERS = "abcdefghijklmnopqrstuvwxyz     éøß北斎🌊"
# Options the soak sets itself; passing them through would break what it measures.
OWN_BRIDGE_OPTIONS = (
    "--input", "--output", "--osc-port", "--no-osc", "--frames", "--quiet", "--mode",
    "--width", "--height",
)  # fmt: skip


def f32(value: float) -> float:
    """`value` as the 32-bit float that an OSC `f` argument carries."""
    return struct.unpack("<f", struct.pack("<f", value))[0]


def f32_below(limit: float) -> float:
    """The largest 32-bit float below `limit` (for `limit` > 0)."""
    (bits,) = struct.unpack("<I", struct.pack("<f", limit))
    return struct.unpack("<f", struct.pack("<I", bits - 1))[0]


# --------------------------------------------------------------------------- OSC churn


@dataclass(frozen=True)
class Change:
    """One OSC message of the churn and what the bridge must make of it.

    `refused` says the bridge must answer `/sd/error <address> ...`; otherwise `/sd/get` must
    report `stored` for `address` from then on.
    """

    address: str
    args: tuple[ArgValue, ...]
    refused: bool
    stored: tuple[object, ...] = ()


class Churn:
    """Draws OSC changes: valid values from the schema, or values the schema forbids.

    It keeps its own record of what the bridge holds (`expected`, as `/sd/value` arguments by
    address), seeded from the bridge's answers, so that valid values stay valid together
    (every `t_index` entry below `num_inference_steps`). The first changes are a sweep over
    every parameter's extremes, so that a fault at an edge shows in every run, and the largest
    shapes (longest `t_index`, each `cfg`) are reached during the warm-up.
    """

    def __init__(self, rng: random.Random, expected: dict[str, tuple[object, ...]]) -> None:
        self.rng = rng
        self.expected = dict(expected)
        self._sweep = self._sweep_order()

    def next(self, invalid: bool) -> Change:
        """The next change: the sweep first, then random; `invalid` asks for a refused one."""
        if self._sweep:
            param, edge = self._sweep.pop(0)
            args, stored = self._edges(param)[edge]
            return Change(param.address, tuple(args), refused=False, stored=tuple(stored))
        if invalid and self.rng.random() < 0.1:
            return self._wrong_address()
        param = self.rng.choice(PARAMS)
        if invalid:
            return Change(param.address, tuple(self._invalid(param)), refused=True)
        if self.rng.random() < 0.2:
            args, stored = self.rng.choice(self._edges(param))
        else:
            args, stored = self._valid(param)
        return Change(param.address, tuple(args), refused=False, stored=tuple(stored))

    def accept(self, change: Change) -> None:
        """Record a change that was sent and must be taken."""
        if not change.refused:
            self.expected[change.address] = change.stored

    @property
    def steps(self) -> int:
        """The num_inference_steps the bridge holds now."""
        return int(self.expected["/sd/num_inference_steps"][0])

    @property
    def top_index(self) -> int:
        """The largest t_index entry the bridge holds now."""
        return max(int(entry) for entry in self.expected["/sd/t_index"])

    @staticmethod
    def _sweep_order() -> list[tuple[Param, int]]:
        """Every edge of every parameter once; the longest t_index stays while cfg sweeps."""
        by_name = {param.name: param for param in PARAMS}
        first = [(by_name["num_inference_steps"], 1), (by_name["t_index_list"], 0)]
        first += [(by_name["cfg_type"], index) for index in range(len(by_name["cfg_type"].choices))]
        last = [(by_name["t_index_list"], 1), (by_name["num_inference_steps"], 0)]
        rest = [
            (param, index)
            for param in PARAMS
            if param.name not in ("num_inference_steps", "t_index_list", "cfg_type")
            for index in range(2)
        ]
        return first + rest + last

    def _edges(self, param: Param) -> list[tuple[list[ArgValue], list[object]]]:
        """Valid extremes: lowest and highest value, each choice, shortest and longest list."""
        if param.kind is Kind.FLOAT:
            low, high = float(param.minimum), float(param.maximum)
            top = f32_below(high) if param.maximum_exclusive else high
            return [([low], [low]), ([top], [top])]
        if param.kind is Kind.INT:
            low, high = int(param.minimum), int(param.maximum)
            if param.name == "num_inference_steps":
                low = self.top_index + 1
            return [([low], [low]), ([high], [high])]
        if param.kind is Kind.BOOL:
            return [([True], [1]), ([False], [0])]
        if param.kind is Kind.STRING:
            longest = "".join(self.rng.choice(WORD_CHARACTERS) for _ in range(param.max_length))
            return [([longest], [longest]), ([""], [""])]
        if param.kind is Kind.CHOICE:
            return [([choice], [choice]) for choice in param.choices]
        steps = self.steps
        longest = sorted(self.rng.sample(range(steps), min(MAX_T_INDICES, steps)))
        shortest = [self.rng.randrange(steps)]
        return [(longest, longest), (shortest, shortest)]

    def _valid(self, param: Param) -> tuple[list[ArgValue], list[object]]:
        rng = self.rng
        if param.kind is Kind.FLOAT:
            value = f32(rng.uniform(float(param.minimum), float(param.maximum)))
            if param.maximum_exclusive:
                value = min(value, f32_below(float(param.maximum)))
            if value.is_integer() and rng.random() < 0.3:
                return [int(value)], [value]  # an `i` is taken for a float
            return [value], [value]
        if param.kind is Kind.INT:
            low = self.top_index + 1 if param.name == "num_inference_steps" else param.minimum
            value = rng.randint(int(low), int(param.maximum))
            if value < 2**24 and rng.random() < 0.2:
                return [float(value)], [value]  # a whole `f` is taken for an int
            return [value], [value]
        if param.kind is Kind.BOOL:
            value = rng.random() < 0.5
            return [value if rng.random() < 0.5 else int(value)], [int(value)]
        if param.kind is Kind.STRING:
            text = "".join(rng.choice(WORD_CHARACTERS) for _ in range(rng.randint(0, 120)))
            return [text], [text]
        if param.kind is Kind.CHOICE:
            value = rng.choice(param.choices)
            return [value], [value]
        steps = self.steps
        entries = sorted(rng.sample(range(steps), min(rng.randint(1, 4), steps)))
        return ([entries] if rng.random() < 0.3 else list(entries)), entries

    def _invalid(self, param: Param) -> list[ArgValue]:
        rng = self.rng
        low, high = param.minimum, param.maximum
        if param.kind is Kind.FLOAT:
            middle = f32((low + high) / 2)
            options: list[list[ArgValue]] = [
                [math.nan], [math.inf], [-math.inf], [low - 1.5], [high + 1.5], ["loud"], [],
                [middle, middle],
            ]  # fmt: skip
            if param.maximum_exclusive:
                options.append([high])
        elif param.kind is Kind.INT:
            options = [[int(low) - 1], [int(high) + 1], [2.5], ["3"], [], [int(low), int(low)]]
            if param.name == "num_inference_steps" and self.top_index >= 1:
                options.append([rng.randint(1, self.top_index)])  # below what t_index needs
        elif param.kind is Kind.BOOL:
            options = [[2], [-1], [0.5], ["yes"], []]
        elif param.kind is Kind.STRING:
            options = [["x" * (param.max_length + rng.randint(1, 2000))], [42], [], ["a", "b"]]
        elif param.kind is Kind.CHOICE:
            options = [[choice.upper()] for choice in param.choices] + [[""], ["half"], [1]]
        else:
            options = [
                [], [5, 3], [4, 4], list(range(MAX_T_INDICES + 1)), [-1], [self.steps], [2.5],
                ["a"],
            ]  # fmt: skip
        return rng.choice(options)

    def _wrong_address(self) -> Change:
        options = [
            *((address, (1,)) for address in UNKNOWN_ADDRESSES),
            ("/sd/get", (5,)),
            ("/sd/get", ("/sd/nope",)),
            ("/sd/list", ("all",)),
            ("/sd/subscribe", ("here",)),
            ("/sd/unsubscribe", (70000,)),
            ("/sd/quit", ("now",)),
        ]
        address, args = self.rng.choice(options)
        return Change(address, args, refused=True)


# --------------------------------------------------------------------------- processes


def feed(name: str, width: int, height: int, fps: float, seed: int, first_write: c_double) -> None:
    """Publish changing RGBA noise under `name` until SIGTERM: the bridge's input.

    Runs in its own process, paced by a frame clock: frame k is stamped `first + k / fps`
    (`stamp`), and `first` is stored in `first_write` before the first frame goes out.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    frames = np.random.default_rng(seed).integers(0, 256, (8, height, width, 4), dtype=np.uint8)
    with ShmWriter(name, width, height, "rgba") as writer:
        first = clock()
        first_write.value = first
        index = 0
        while True:
            writer.write(frames[index % len(frames)], capture_time=stamp(first, index, fps))
            index = max(index + 1, math.ceil((clock() - first) * fps))  # late: skip ticks
            if stop.wait(max(0.0, stamp(first, index, fps) - clock())):
                break


def stamp(first: float, index: int, fps: float) -> float:
    """Capture time of frame `index` of a writer whose frame clock started at `first`."""
    return first + index / fps


def stamped_by(capture_time: float, first: float, fps: float) -> bool:
    """Whether `capture_time` is a tick of the frame clock that started at `first`.

    A frame the bridge diffused carries its input's capture time; a frame it repeats while the
    input is gone carries the capture time of the frame it repeats, so it is told apart by not
    being newer than the last one seen.
    """
    index = round((capture_time - first) * fps)
    return index >= 0 and stamp(first, index, fps) == capture_time


class Feeder:
    """The writer process behind the bridge's input, killed and restarted to flap it."""

    def __init__(self, name: str, width: int, height: int, fps: float, seed: int) -> None:
        self.name = name
        self.fps = fps
        self._args = (name, width, height, fps)
        self._seed = seed
        self._context = multiprocessing.get_context("spawn")  # portable: no fork
        self._first_write = self._context.RawValue("d", 0.0)
        self._process: multiprocessing.process.BaseProcess | None = None
        self.starts = 0

    @property
    def first_write(self) -> float | None:
        """Capture time of the running writer's first frame; None until it has written one."""
        value = self._first_write.value
        return value if self._process is not None and value > 0 else None

    def start(self) -> None:
        """Start a new writer process; it takes over the name the last one left behind."""
        self._first_write.value = 0.0
        self.starts += 1
        self._process = self._context.Process(
            target=feed,
            args=(*self._args, self._seed + self.starts, self._first_write),
            name="soak-feed",
            daemon=True,
        )
        self._process.start()

    def kill(self) -> None:
        """SIGKILL the writer and reap it: its segments stay behind, as after a crash."""
        if self._process is not None:
            self._process.kill()
            self._process.join()
            self._process = None

    def stop(self) -> None:
        """End the writer cleanly (it removes its segments), or kill it if it does not end."""
        if self._process is not None:
            self._process.terminate()
            self._process.join(5.0)
        self.kill()
        remove_stream(self.name)


def remove_stream(name: str) -> None:
    """Remove the segments a killed writer left under `name`, by taking the name over."""
    try:
        ShmWriter(name, 8, 8).close()
    except (ShmError, OSError):
        pass


class Bridge:
    """The `sd-bridge run` process under test, its log file, and its memory and threads."""

    def __init__(self, arguments: list[str], log_path: Path) -> None:
        self.command = [sys.executable, "-m", "bridge.cli", "run", *arguments]
        self.log_path = log_path
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        group = {"creationflags": subprocess.CREATE_NEW_PROCESS_GROUP} if os.name == "nt" else {}
        with log_path.open("wb") as log:
            self.process = subprocess.Popen(
                self.command, stdout=log, stderr=subprocess.STDOUT, env=env, **group
            )

    @property
    def pid(self) -> int:
        """The bridge's process id."""
        return self.process.pid

    def exited(self) -> int | None:
        """The exit code if the bridge has ended, else None."""
        return self.process.poll()

    def stop(self) -> tuple[int | None, float]:
        """Ask the bridge to stop as Ctrl-C would; return its exit code (None: had to kill it)
        and the seconds it took."""
        started = clock()
        if self.process.poll() is None:
            self.process.send_signal(signal.CTRL_BREAK_EVENT if os.name == "nt" else signal.SIGTERM)
        try:
            code: int | None = self.process.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            code = None
        return code, clock() - started

    def kill(self) -> None:
        """Kill the bridge if it still runs."""
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()

    def log(self) -> str:
        """Everything the bridge printed so far."""
        return self.log_path.read_text(errors="replace")

    def rss_kib(self) -> int | None:
        """Resident memory in KiB: VmRSS on Linux, psutil elsewhere, None if neither works."""
        fields = _proc_status(self.pid)
        if fields is not None:
            return int(fields["VmRSS"].split()[0])
        process = _psutil_process(self.pid)
        return None if process is None else process.memory_info().rss // 1024

    def threads(self) -> int | None:
        """Thread count: Threads on Linux, psutil elsewhere, None if neither works."""
        fields = _proc_status(self.pid)
        if fields is not None:
            return int(fields["Threads"])
        process = _psutil_process(self.pid)
        return None if process is None else process.num_threads()

    def gpu_mib(self) -> float | None:
        """GPU memory nvidia-smi lists for the bridge; None without nvidia-smi or a listing."""
        executable = shutil.which("nvidia-smi")
        if executable is None:
            return None
        query = [
            executable,
            "--query-compute-apps=pid,used_memory",
            "--format=csv,noheader,nounits",
        ]
        try:
            listing = subprocess.run(query, capture_output=True, text=True, timeout=10).stdout
        except (OSError, subprocess.SubprocessError):
            return None
        for line in listing.splitlines():
            pid, _, used = (part.strip() for part in line.partition(","))
            if pid == str(self.pid) and used.replace(".", "", 1).isdigit():
                return float(used)
        return None


def _proc_status(pid: int) -> dict[str, str] | None:
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    return dict(line.split(":\t", 1) for line in text.splitlines() if ":\t" in line)


def _psutil_process(pid: int):
    try:
        import psutil
    except ImportError:
        return None
    try:
        return psutil.Process(pid)
    except psutil.Error:
        return None


def free_udp_port() -> int:
    """A UDP port on 127.0.0.1 that nobody holds right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


# --------------------------------------------------------------------------- measuring


@dataclass
class Flap:
    """One loss of the input: when, for how long, and how soon frames flowed again."""

    at_s: float
    down_s: float
    recovery_s: float | None = None


@dataclass
class Sample:
    """The figures at one moment (after the warm-up, at the end); counts are totals so far."""

    at_s: float
    frames: int
    diffused: int
    output_fps: float
    status_fps: float | None
    drops: int | None
    skips: int | None
    osc_sent: int
    osc_invalid_sent: int
    refusals_received: int
    refusals_missing: int
    unexpected_errors: int
    input_loss_reports: int
    answering: bool
    values_match: bool
    rss_kib: int | None
    threads: int | None
    gpu_mib: float | None
    flaps: int
    flaps_recovered: int


@dataclass
class Report:
    """Everything the soak measured; written as JSON with `--json`."""

    command: list[str]
    minutes: float
    seed: int
    startup_s: float | None = None
    warmup: Sample | None = None
    end: Sample | None = None
    flaps: list[Flap] = field(default_factory=list)
    rss_series: list[tuple[float, int | None]] = field(default_factory=list)
    rss_growth_percent: float | None = None
    max_rss_growth_percent: float = 2.0
    unexpected_error_examples: list[list[object]] = field(default_factory=list)
    mismatched_values: dict[str, list[object]] = field(default_factory=dict)
    problem: str | None = None
    crashed: bool = False
    exit_code: int | None = None
    stop_s: float | None = None
    traceback_in_log: bool = False
    log_tail: str = ""
    targets: dict[str, bool] = field(default_factory=dict)
    passed: bool = False


class Soak:
    """Runs the bridge, the churn and the flaps, and fills a `Report`."""

    def __init__(self, args: argparse.Namespace, bridge_args: list[str], workdir: Path) -> None:
        self.args = args
        self.rng = random.Random(args.seed)
        tag = f"sk{os.getpid()}"
        self.input_name, self.output_name = f"{tag}i", f"{tag}o"
        self.port = args.osc_port or free_udp_port()
        self.bridge_args = [
            *bridge_args,
            "--width", str(args.width), "--height", str(args.height),
            "--input", f"shm:{self.input_name}", "--output", f"shm:{self.output_name}",
            "--osc-port", str(self.port), "--quiet",
        ]  # fmt: skip
        self.report = Report(
            command=["sd-bridge", "run", *self.bridge_args],
            minutes=args.minutes,
            seed=args.seed,
            max_rss_growth_percent=args.max_rss_growth,
        )
        self.workdir = workdir
        self.feeder = Feeder(self.input_name, args.width, args.height, args.input_fps, args.seed)
        self.bridge: Bridge | None = None
        self.reader: ShmReader | None = None
        self.client: OscClient | None = None
        self.churn: Churn | None = None
        self.started = 0.0  # clock() at the first output frame
        self.frames = 0
        self.diffused = 0  # output frames made from the input, not repeated while it was gone
        self.newest_capture = -math.inf
        self.writer_clocks: list[float] = []  # each input writer's first stamp
        self.flap_killed_at = 0.0
        self.status: dict[str, object] = {}
        self.values: dict[str, tuple[object, ...]] = {}
        self.pending_refusals: Counter[str] = Counter()
        self.refusals_received = 0
        self.unexpected_errors = 0
        self.input_loss_reports = 0
        self.resync = False
        self.sent = 0
        self.invalid_sent = 0
        self.down_until: float | None = None
        self.next_flap = math.inf
        self.unpause_at: float | None = None

    def run(self) -> Report:
        """Start everything, soak for the requested minutes, stop everything; return figures."""
        report = self.report
        try:
            self.feeder.start()
            self.reader = ShmReader(self.output_name)
            self.client = OscClient("127.0.0.1", self.port, timeout=REPLY_TIMEOUT_S)
            self.bridge = Bridge(self.bridge_args, self.workdir / "bridge.log")
            launched = clock()
            if not self._wait_for_first_frame():
                return self._finish()
            report.startup_s = self.started - launched
            self._soak()
            return self._finish()
        finally:
            self._close()

    def _wait_for_first_frame(self) -> bool:
        deadline = clock() + self.args.startup_timeout
        while self.frames == 0:
            if self.bridge.exited() is not None:
                self.report.problem = "the bridge ended before its first output frame"
                return False
            if clock() > deadline:
                self.report.problem = (
                    f"no output frame within {self.args.startup_timeout:g} s; "
                    "raise --startup-timeout if the model takes longer to prepare"
                )
                return False
            self._tick()
            time.sleep(0.01)
        self.started = clock()
        if not self._ask_all():
            self.report.problem = "the bridge did not answer /sd/get once it ran"
            return False
        self.churn = Churn(self.rng, self.values)
        self.client.send("/sd/subscribe", self.client.local_address[1])
        return True

    def _soak(self) -> None:
        duration = self.args.minutes * 60
        warmup_at = self.started + max(MIN_WARMUP_S, WARMUP_FRACTION * duration)
        end_at = self.started + duration
        calm_from = end_at - max(MIN_CALM_S, CALM_FRACTION * duration)
        next_change = self.started
        next_rss = self.started
        self.next_flap = self.started + self._up_time()
        while (moment := clock()) < end_at:
            if self.bridge.exited() is not None:
                self.report.crashed = True
                return
            self._tick()
            if self.resync and self._ask_all():
                self.churn.expected = dict(self.values)
                self.resync = False
            if moment >= next_change:
                self._send_change()
                next_change = moment + self.rng.expovariate(self.args.rate)
            if self.unpause_at is not None and moment >= self.unpause_at:
                self._unpause()
            self._flap(moment, calm_from)
            if moment >= next_rss:
                self.report.rss_series.append((round(moment - self.started, 1), self._rss()))
                next_rss = moment + RSS_EVERY_S
            if self.report.warmup is None and moment >= warmup_at:
                self.report.warmup = self._sample(moment)
            time.sleep(0.002)
        self._unpause()
        self.report.end = self._sample(clock())

    def _tick(self) -> None:
        """Take in new output frames and OSC replies; never waits."""
        first = self.feeder.first_write
        if first is not None and (not self.writer_clocks or self.writer_clocks[-1] != first):
            self.writer_clocks.append(first)
        while (got := self.reader.read()) is not None:
            self._on_frame(got[1].capture_time)
        while (reply := self.client.receive(0)) is not None:
            self._on_reply(*reply)

    def _on_frame(self, capture_time: float) -> None:
        self.frames += 1
        if capture_time <= self.newest_capture:
            return  # a frame held while the input was gone
        self.newest_capture = capture_time
        fps = self.feeder.fps
        if not any(stamped_by(capture_time, first, fps) for first in self.writer_clocks[-2:]):
            return
        self.diffused += 1
        flap = self.report.flaps[-1] if self.report.flaps else None
        if flap is None or flap.recovery_s is not None:
            return
        first = self.writer_clocks[-1]
        if first > self.flap_killed_at and stamped_by(capture_time, first, fps):
            arrived = clock()  # the restarted writer's input came out diffused
            flap.recovery_s = round(arrived - first, 3)
            self.next_flap = arrived + self._up_time()

    def _on_reply(self, address: str, args: list[object]) -> None:
        if address.startswith("/sd/status/"):
            self.status[address.removeprefix("/sd/status/")] = args[0] if args else None
        elif address == "/sd/value" and args:
            self.values[str(args[0])] = tuple(args[1:])
        elif address == "/sd/error":
            about = str(args[0]) if args else ""
            if about == "/sd/input":
                self.input_loss_reports += 1  # the bridge saying its input went away
            elif self.pending_refusals[about] > 0:
                self.pending_refusals[about] -= 1
                self.refusals_received += 1
            else:
                self.unexpected_errors += 1
                if len(self.report.unexpected_error_examples) < 10:
                    self.report.unexpected_error_examples.append(args)
                # The engine reports a setting it could not apply as "/sd" and may put the
                # store back to the last settings that worked: learn what it holds now.
                self.resync = self.resync or about == "/sd"

    def _send_change(self) -> None:
        change = self.churn.next(invalid=self.rng.random() < self.args.invalid)
        self._send(change)
        if change.address == "/sd/pause" and change.stored == (1,):
            self.unpause_at = clock() + self.rng.uniform(0.3, 1.0)

    def _unpause(self) -> None:
        if self.unpause_at is not None:
            self._send(Change("/sd/pause", (0,), refused=False, stored=(0,)))
            self.unpause_at = None

    def _send(self, change: Change) -> None:
        self.client.send(change.address, *change.args)
        self.sent += 1
        if change.refused:
            self.invalid_sent += 1
            self.pending_refusals[change.address] += 1
        self.churn.accept(change)

    def _flap(self, moment: float, calm_from: float) -> None:
        """Kill the writer when a flap is due; restart it when its down time is over."""
        if self.down_until is not None:
            if moment >= self.down_until:
                self.feeder.start()
                self.down_until = None
            return
        if moment < self.next_flap or moment >= calm_from:
            return
        self.feeder.kill()
        self.flap_killed_at = moment
        down = self.rng.uniform(self.args.down_min, self.args.down_max)
        self.report.flaps.append(Flap(at_s=round(moment - self.started, 2), down_s=round(down, 2)))
        self.down_until = moment + down
        self.next_flap = math.inf  # set again once frames flow from the next writer

    def _up_time(self) -> float:
        return self.rng.uniform(self.args.up_min, self.args.up_max)

    def _ask_all(self) -> bool:
        """Ask `/sd/get` for every value and wait for all of them; True if they came."""
        self.values = {}
        self.client.send("/sd/get")
        deadline = clock() + REPLY_TIMEOUT_S
        while len(self.values) < len(PARAMS) and clock() < deadline:
            self._tick()
            time.sleep(0.002)
        return len(self.values) == len(PARAMS)

    def _sample(self, moment: float) -> Sample:
        answering = self._ask_all()
        mismatched = {
            address: [list(self.values.get(address, ())), list(value)]
            for address, value in self.churn.expected.items()
            if self.values.get(address) != value
        }
        self.report.mismatched_values.update(mismatched)
        warm = self.report.warmup
        since, frames_before = (warm.at_s, warm.frames) if warm else (0.0, 0)
        elapsed = moment - self.started - since
        flaps = self.report.flaps
        return Sample(
            at_s=round(moment - self.started, 2),
            frames=self.frames,
            diffused=self.diffused,
            output_fps=round((self.frames - frames_before) / elapsed, 2) if elapsed > 0 else 0.0,
            status_fps=_rounded(self.status.get("fps")),
            drops=_whole(self.status.get("drops")),
            skips=_whole(self.status.get("skips")),
            osc_sent=self.sent,
            osc_invalid_sent=self.invalid_sent,
            refusals_received=self.refusals_received,
            refusals_missing=sum(self.pending_refusals.values()),
            unexpected_errors=self.unexpected_errors,
            input_loss_reports=self.input_loss_reports,
            answering=answering,
            values_match=answering and not mismatched,
            rss_kib=self._rss(),
            threads=self.bridge.threads(),
            gpu_mib=self.bridge.gpu_mib(),
            flaps=len(flaps),
            flaps_recovered=sum(flap.recovery_s is not None for flap in flaps),
        )

    def _rss(self) -> int | None:
        return self.bridge.rss_kib() if self.bridge.exited() is None else None

    def _finish(self) -> Report:
        report = self.report
        bridge = self.bridge
        if bridge is not None:
            if bridge.exited() is None:
                report.exit_code, stop_s = bridge.stop()
                report.stop_s = round(stop_s, 2)
            else:
                report.crashed = True
                report.exit_code = bridge.exited()
            log = bridge.log()
            report.traceback_in_log = "Traceback" in log
            report.log_tail = "\n".join(log.splitlines()[-20:])
        report.rss_growth_percent = rss_growth(report.warmup, report.end)
        report.targets = targets(report)
        report.passed = all(report.targets.values())
        return report

    def _close(self) -> None:
        if self.bridge is not None:
            self.bridge.kill()
        self.feeder.stop()
        if self.reader is not None:
            self.reader.close()
        if self.client is not None:
            self.client.close()
        remove_stream(self.output_name)  # left behind only if the bridge was killed


def _rounded(value: object) -> float | None:
    return round(float(value), 2) if isinstance(value, (int, float)) else None


def _whole(value: object) -> int | None:
    return int(value) if isinstance(value, (int, float)) else None


def rss_growth(warmup: Sample | None, end: Sample | None) -> float | None:
    """Percent growth of the bridge's RSS from the warm-up sample to the end one."""
    if warmup is None or end is None or not warmup.rss_kib or end.rss_kib is None:
        return None
    return round((end.rss_kib - warmup.rss_kib) / warmup.rss_kib * 100, 2)


def targets(report: Report) -> dict[str, bool]:
    """Each target the soak checks, and whether it held."""
    end = report.end
    growth = report.rss_growth_percent
    flaps = report.flaps
    return {
        "no crash": not report.crashed and report.exit_code == 0 and not report.traceback_in_log,
        "still answering": end is not None and end.answering and end.values_match,
        "frames flowed": end is not None
        and report.warmup is not None
        and end.frames > report.warmup.frames,
        "frames after every flap": bool(flaps) and all(f.recovery_s is not None for f in flaps),
        "OSC errors as expected": end is not None
        and end.refusals_missing == 0
        and end.unexpected_errors == 0,
        "RSS growth": growth is not None and growth < report.max_rss_growth_percent,
        "quick stop": report.stop_s is not None and report.stop_s < MAX_STOP_S,
    }


# --------------------------------------------------------------------------- output


def table(report: Report) -> str:
    """The report as a short table and a list of targets."""
    warm, end = report.warmup, report.end
    startup = f"{report.startup_s:.1f} s" if report.startup_s is not None else "no first frame"
    lines = [
        f"soak: {report.minutes:g} min after a start-up of {startup}, seed {report.seed}",
        f"  {' '.join(report.command)}",
        *([f"  problem: {report.problem}"] if report.problem else []),
        f"  {'':<28}{'warm-up':>14}{'end':>14}",
    ]
    rows = [
        ("at (s)", lambda s: f"{s.at_s:.1f}"),
        ("frames received (diffused)", lambda s: f"{s.frames} ({s.diffused})"),
        ("output fps (since previous)", lambda s: f"{s.output_fps:.2f}"),
        ("/sd/status fps", lambda s: _shown(s.status_fps)),
        ("drops / skips", lambda s: f"{_shown(s.drops)} / {_shown(s.skips)}"),
        ("OSC sent (invalid)", lambda s: f"{s.osc_sent} ({s.osc_invalid_sent})"),
        ("refusals received / missing", lambda s: f"{s.refusals_received} / {s.refusals_missing}"),
        ("unexpected OSC errors", lambda s: str(s.unexpected_errors)),
        ("answers /sd/get, as sent", lambda s: f"{_yes(s.answering)}, {_yes(s.values_match)}"),
        ("RSS (MiB)", lambda s: _shown(s.rss_kib and round(s.rss_kib / 1024, 1))),
        ("threads", lambda s: _shown(s.threads)),
        ("GPU memory (MiB)", lambda s: _shown(s.gpu_mib)),
        ("input flaps (recovered)", lambda s: f"{s.flaps} ({s.flaps_recovered})"),
        ("input-loss reports", lambda s: str(s.input_loss_reports)),
    ]
    for label, show in rows:
        cells = [show(sample) if sample is not None else "-" for sample in (warm, end)]
        lines.append(f"  {label:<28}{cells[0]:>14}{cells[1]:>14}")
    recoveries = [flap.recovery_s for flap in report.flaps if flap.recovery_s is not None]
    if recoveries:
        lines.append(
            f"  flap recovery: median {statistics.median(recoveries):.2f} s, "
            f"max {max(recoveries):.2f} s"
        )
    stopped = f" in {report.stop_s:.2f} s" if report.stop_s is not None else ""
    how = "ended during the soak" if report.crashed else "after SIGTERM"
    lines.append(f"  bridge exit: {_shown(report.exit_code)} {how}{stopped}")
    growth = report.rss_growth_percent
    notes = {
        "RSS growth": f"{_shown(growth)}% from warm-up to end "
        f"(target < {report.max_rss_growth_percent:g}%)",
        "no crash": "alive throughout, exit 0 after SIGTERM, no traceback",
        "still answering": "/sd/get returns every value as last sent",
        "quick stop": f"exit within {MAX_STOP_S:g} s of SIGTERM",
    }
    lines.append("targets:")
    for name, held in report.targets.items():
        note = f": {notes[name]}" if name in notes else ""
        lines.append(f"  {'ok  ' if held else 'FAIL'}  {name}{note}")
    if report.unexpected_error_examples:
        lines.append("unexpected errors (first ones):")
        lines.extend(f"  {example}" for example in report.unexpected_error_examples[:3])
    if not report.passed and report.log_tail:
        lines.append("bridge log (last lines):")
        lines.extend(f"  {line}" for line in report.log_tail.splitlines()[-8:])
    lines.append(f"result: {'PASS' if report.passed else 'FAIL'}")
    return "\n".join(lines)


def _shown(value: object) -> str:
    return "-" if value is None else str(value)


def _yes(flag: bool) -> str:
    return "yes" if flag else "no"


# --------------------------------------------------------------------------- command line


def parse_arguments(argv: list[str] | None) -> tuple[argparse.Namespace, list[str]]:
    """The soak's own options, and the rest for `sd-bridge run`."""
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        epilog="Other options are passed to sd-bridge run (default: --model synthetic:tiny).",
        allow_abbrev=False,
    )
    parser.add_argument("--minutes", type=float, required=True, help="length of the soak")
    parser.add_argument("--json", type=Path, help="write the figures to this file")
    parser.add_argument("--width", type=int, default=64, help="frame width (default 64)")
    parser.add_argument("--height", type=int, default=64, help="frame height (default 64)")
    parser.add_argument("--seed", type=int, help="seed of the churn and flaps (default: random)")
    parser.add_argument("--osc-port", type=int, help="the bridge's OSC port (default: a free one)")
    parser.add_argument("--rate", type=float, default=4.0, help="OSC messages a second")
    parser.add_argument("--invalid", type=float, default=0.2, help="share of invalid messages")
    parser.add_argument("--input-fps", type=float, default=30.0, help="pace of the input writer")
    parser.add_argument("--up-min", type=float, default=2.0, help="least seconds between flaps")
    parser.add_argument("--up-max", type=float, default=6.0, help="most seconds between flaps")
    parser.add_argument("--down-min", type=float, default=0.2, help="least seconds input is gone")
    parser.add_argument("--down-max", type=float, default=2.0, help="most seconds input is gone")
    parser.add_argument(
        "--max-rss-growth", type=float, default=2.0, help="RSS growth target in percent"
    )
    parser.add_argument(
        "--startup-timeout", type=float, default=600.0, help="seconds to wait for a first frame"
    )
    args, bridge_args = parser.parse_known_args(argv)
    for option in bridge_args:
        if option.split("=", 1)[0] in OWN_BRIDGE_OPTIONS:
            parser.error(f"{option} is set by the soak itself; leave it out.")
    if args.minutes <= 0 or args.rate <= 0 or not 0 <= args.invalid <= 1:
        parser.error("--minutes and --rate must be positive and --invalid from 0 to 1.")
    if "--model" not in [option.split("=", 1)[0] for option in bridge_args]:
        bridge_args = ["--model", "synthetic:tiny", *bridge_args]
    if args.seed is None:
        args.seed = random.SystemRandom().randrange(2**31)
    return args, bridge_args


def _interrupt(*_: object) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    """Run the soak; 0 when every target holds, 1 otherwise."""
    args, bridge_args = parse_arguments(argv)
    signal.signal(signal.SIGTERM, _interrupt)  # so `finally` ends the children
    with tempfile.TemporaryDirectory(prefix="soak-") as workdir:
        try:
            report = Soak(args, bridge_args, Path(workdir)).run()
        except KeyboardInterrupt:
            print("soak interrupted; the bridge and the input writer were stopped.")
            return 1
    print(table(report))
    if args.json:
        args.json.write_text(json.dumps(asdict(report), indent=2))
    return 0 if report.passed else 1


if __name__ == "__main__":
    sys.exit(main())
