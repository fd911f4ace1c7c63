"""Fuzzing what reaches a bridge from outside: 100,000 hostile OSC datagrams, 10,000 bad segments.

The OSC half sends a real `sd-bridge run` process random bytes, truncated messages, wrong type
tags, huge strings, deep bundles and well-formed messages with arguments nothing takes. Each
well-formed but wrong message must be answered with exactly one `/sd/error`, which counts the
datagrams the server really read; the bridge must keep its frames coming, and afterwards still
answer `/sd/get` and take a valid change.

The shared-memory half hands `ShmReader` index and frame segments with broken headers and
sizes: each read returns None or raises the documented `ShmError`, never anything else, and
never hangs.
"""

from __future__ import annotations

import math
import os
import random
import socket
import struct
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from pythonosc.osc_message_builder import OscMessageBuilder

from bridge.control import OscClient
from bridge.control.osc_datagram import MAX_BUNDLE_DEPTH
from bridge.control.params import PARAMS
from bridge.io.shm_protocol import ShmError, ShmReader, clock, frame_segment_name
from tests.runtime.helpers import free_port

DATAGRAMS = 100_000
SEGMENT_CASES = 10_000
# A socket buffer of the kernel's default size (212 KB) holds about 200 small datagrams: the
# sender waits for the server to catch up before that much could be in flight.
SYNC_EVERY_DATAGRAMS = 100
SYNC_EVERY_BYTES = 64_000
SYNC_TIMEOUT_S = 20.0

# Chaos may form a valid message by chance: a paused bridge stops its frames on purpose, and a
# bare /sd/quit stops the bridge, so those two get only arguments they must refuse.
CHAOS_ADDRESSES = [p.address for p in PARAMS if p.address != "/sd/pause"] + [
    "/sd/get", "/sd/list", "/sd/subscribe", "/sd/unsubscribe", "/sd", "/x",
]  # fmt: skip
TYPE_TAGS = "ifsbhdtTFNI[]cmrSx?"
# Arguments that every parameter refuses: none, nil, a blob, NaN, infinity, two of them, a huge
# negative, booleans where one value goes, a nested array.
REFUSED_EVERYWHERE: list[list] = [
    [], [None], [b"\x00\x01"], [math.nan], [math.inf], ["x", "y"], [-1e30], [True, False],
    [[1, [2]]],
]  # fmt: skip
REFUSED_COMMANDS: list[tuple[str, list]] = [
    ("/sd/get", [1]),
    ("/sd/get", ["/sd/nope"]),
    ("/sd/get", ["a", "b"]),
    ("/sd/list", [1]),
    ("/sd/subscribe", ["x"]),
    ("/sd/subscribe", [0]),
    ("/sd/unsubscribe", [70000]),
    ("/sd/quit", [1]),
]


def osc_message(address: str, *args: object) -> bytes:
    builder = OscMessageBuilder(address=address)
    for arg in args:
        builder.add_arg(arg)
    return builder.build().dgram


def osc_string(text: str | bytes) -> bytes:
    raw = text.encode() if isinstance(text, str) else text
    return raw + b"\x00" * (4 - len(raw) % 4)


def bundle(*contents: bytes) -> bytes:
    body = b"".join(struct.pack(">i", len(content)) + content for content in contents)
    return b"#bundle\x00" + struct.pack(">II", 0, 1) + body


class Fuzz:
    """Draws datagrams: `refused` ones earn exactly one /sd/error each, `chaos` ones anything."""

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)
        self.unknown = 0

    def refused(self) -> tuple[bytes, int]:
        """A well-formed datagram and the number of /sd/error replies it must get."""
        rng = self.rng
        roll = rng.random()
        if roll < 0.02:
            return self._huge_string(), 1
        if roll < 0.12:
            messages = [self._refused_message() for _ in range(rng.randint(1, 5))]
            datagram = bundle(*messages)
            for _ in range(rng.randint(0, MAX_BUNDLE_DEPTH - 1)):  # deeper is dropped unread
                datagram = bundle(datagram)
            return datagram, len(messages)
        return self._refused_message(), 1

    def chaos(self) -> bytes:
        """A datagram that may be anything: the server must only survive it."""
        kinds = [
            self._random_bytes, self._truncated, self._wrong_type_tags, self._deep_bundle,
            self._broken_bundle,
        ]  # fmt: skip
        (draw,) = self.rng.choices(kinds, weights=[25, 20, 20, 5, 5])
        return draw()

    def _refused_message(self) -> bytes:
        rng = self.rng
        roll = rng.random()
        if roll < 0.7:
            return osc_message(rng.choice(PARAMS).address, *rng.choice(REFUSED_EVERYWHERE))
        if roll < 0.85:
            return osc_message(*self._command())
        self.unknown += 1
        return osc_message(f"/fuzz/{self.unknown}", rng.random())

    def _command(self) -> tuple:
        address, args = self.rng.choice(REFUSED_COMMANDS)
        return (address, *args)

    def _huge_string(self) -> bytes:
        rng = self.rng
        if rng.random() < 0.5:
            return osc_message("/sd/prompt", "p" * rng.randint(20_000, 60_000))
        # The error reply repeats the address cut short, so any length gets its one reply.
        return osc_message("/" + "u" * rng.randint(20_000, 30_000), 1)

    def _random_bytes(self) -> bytes:
        rng = self.rng
        prefix = rng.choice([b"", b"/", b"/sd/", b"#bundle\x00"])
        return prefix + rng.randbytes(rng.randint(0, 512))

    def _truncated(self) -> bytes:
        rng = self.rng
        args = rng.choice(REFUSED_EVERYWHERE + [["a forest"], [1, 2.5, "x"], [7]])
        whole = osc_message(rng.choice(CHAOS_ADDRESSES), *args)
        return whole[: rng.randrange(len(whole))]

    def _wrong_type_tags(self) -> bytes:
        rng = self.rng
        tags = "".join(rng.choice(TYPE_TAGS) for _ in range(rng.randint(0, 12)))
        comma = "," if rng.random() < 0.8 else ""
        payload = rng.randbytes(rng.randint(0, 64))
        return osc_string(rng.choice(CHAOS_ADDRESSES)) + osc_string(comma + tags) + payload

    def _deep_bundle(self) -> bytes:
        rng = self.rng
        depth = int(math.exp(rng.uniform(math.log(30), math.log(3000))))
        datagram = self._refused_message()
        for _ in range(depth):
            datagram = bundle(datagram)
        return datagram

    def _broken_bundle(self) -> bytes:
        rng = self.rng
        content = rng.randbytes(rng.randint(0, 64))
        size = rng.choice([-1, 0, 3, len(content) + 4, 2**31 - 1, rng.randint(-(2**31), 2**31 - 1)])
        return b"#bundle\x00" + rng.randbytes(8) + struct.pack(">i", size) + content


@dataclass
class RunningBridge:
    process: subprocess.Popen
    port: int
    output: ShmReader
    log: Path


@pytest.fixture
def running_bridge(tmp_path, shm_name) -> Iterator[RunningBridge]:
    """A bridge on the moving test pattern, writing to null and to a shm output we read."""
    port = free_port()
    output = shm_name()
    log = tmp_path / "bridge.log"
    command = [
        sys.executable, "-m", "bridge.cli", "run", "--model", "synthetic:tiny",
        "--width", "64", "--height", "64", "--output", "null", "--output", f"shm:{output}",
        "--osc-port", str(port), "--quiet",
    ]  # fmt: skip
    env = {**os.environ, "SD_BRIDGE_CACHE": str(tmp_path / "cache"), "PYTHONUNBUFFERED": "1"}
    with log.open("wb") as sink:  # a file, not a pipe: 100,000 warnings would fill a pipe
        process = subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT, env=env)
    reader = ShmReader(output)
    try:
        yield RunningBridge(process, port, reader, log)
    finally:
        reader.close()
        if process.poll() is None:
            process.kill()
        process.wait(10)


def next_frame_counter(bridge: RunningBridge, timeout: float) -> int | None:
    """The counter of the next new output frame, or None if none comes in time."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert bridge.process.poll() is None, bridge.log.read_text()[-2000:]
        got = bridge.output.read()
        if got is not None:
            return got[1].frame_counter
        time.sleep(0.005)
    return None


def count_replies(sock: socket.socket, wanted: int, timeout: float) -> int:
    """Read `/sd/error` replies from `sock` until `wanted` came or `timeout` passed."""
    received = 0
    deadline = time.monotonic() + timeout
    while received < wanted and (left := deadline - time.monotonic()) > 0:
        sock.settimeout(left)
        try:
            data = sock.recv(65535)
        except TimeoutError:
            break
        assert data.startswith(b"/sd/error\x00"), data[:40]
        received += 1
    return received


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_hundred_thousand_hostile_datagrams_leave_the_bridge_running_and_answering(
    running_bridge,
):
    bridge = running_bridge
    assert next_frame_counter(bridge, 120) is not None, "the bridge gave no first frame"
    fuzz = Fuzz(seed=20261126)
    target = ("127.0.0.1", bridge.port)
    chaos = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)  # its replies are never read
    answered = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    chaos.bind(("127.0.0.1", 0))
    answered.bind(("127.0.0.1", 0))
    counters = [next_frame_counter(bridge, 10)]
    expected = received = pending_bytes = pending = 0
    started = time.monotonic()
    next_look = started + 2.0
    try:
        for index in range(DATAGRAMS):
            if index % 5 < 2:
                datagram, replies = fuzz.refused()
                answered.sendto(datagram, target)
                expected += replies
            else:
                datagram = fuzz.chaos()
                chaos.sendto(datagram, target)
            pending += 1
            pending_bytes += len(datagram) + 1000  # what the kernel counts per datagram
            if pending >= SYNC_EVERY_DATAGRAMS or pending_bytes >= SYNC_EVERY_BYTES:
                # Replies come in order, so all of them means the server read everything sent.
                received += count_replies(answered, expected - received, SYNC_TIMEOUT_S)
                assert received == expected, (
                    f"after {index + 1} datagrams the server answered {received} of {expected} "
                    f"refusals; log: {bridge.log.read_text()[-2000:]}"
                )
                pending = pending_bytes = 0
                if time.monotonic() >= next_look:
                    got = bridge.output.read()
                    counters.append(got[1].frame_counter if got is not None else counters[-1])
                    next_look = time.monotonic() + 2.0
        received += count_replies(answered, expected - received, SYNC_TIMEOUT_S)
    finally:
        chaos.close()
        answered.close()
    fuzz_seconds = time.monotonic() - started

    assert received == expected
    assert bridge.process.poll() is None, bridge.log.read_text()[-2000:]
    after = next_frame_counter(bridge, 10)
    assert after is not None and after > counters[0], "no frame came after the fuzz"
    assert counters[-1] > counters[0], f"frames stopped during {fuzz_seconds:.0f} s of fuzz"
    with OscClient("127.0.0.1", bridge.port, timeout=5.0) as client:
        assert isinstance(client.get("prompt")[0], str)
        client.send("/sd/delta", 0.5)
        assert client.get("delta") == [0.5]
    log = bridge.log.read_text()
    assert "Traceback" not in log and "was not handled" not in log


# --------------------------------------------------------------------------- shared memory

# The index header, from docs/shm-protocol.md: name, offset, struct code.
FIELDS = [
    ("magic", 0, "8s"), ("version", 8, "H"), ("header_size", 10, "H"), ("flags", 12, "I"),
    ("writer_pid", 16, "I"), ("buffer_count", 20, "I"), ("heartbeat", 24, "d"), ("seq", 32, "Q"),
    ("generation", 40, "I"), ("width", 44, "I"), ("height", 48, "I"), ("channels", 52, "I"),
    ("pixel_format", 56, "I"), ("row_stride", 60, "I"), ("buffer_stride", 64, "Q"),
    ("active_buffer", 72, "I"), ("writer_session", 76, "I"), ("frame_counter", 80, "Q"),
    ("capture_time", 88, "d"),
]  # fmt: skip
WIDTH, HEIGHT, CHANNELS = 16, 8, 4
VALID = {
    "magic": b"SDBFRAME", "version": 1, "header_size": 112, "flags": 0, "writer_pid": 1,
    "buffer_count": 2, "heartbeat": 0.0, "seq": 2, "generation": 1, "width": WIDTH,
    "height": HEIGHT, "channels": CHANNELS, "pixel_format": 2, "row_stride": WIDTH * CHANNELS,
    "buffer_stride": 512, "active_buffer": 0, "writer_session": 7, "frame_counter": 1,
    "capture_time": 0.0,
}  # fmt: skip


def edge_values(code: str, rng: random.Random) -> list:
    if code == "8s":
        return [b"\x00" * 8, b"SDBFRAMX", rng.randbytes(8)]
    if code == "d":
        return [math.nan, math.inf, -math.inf, 0.0, -1.0, 1e308, rng.uniform(-1e9, 1e9)]
    top = 2 ** (8 * struct.calcsize(code)) - 1
    return [0, 1, 2, 3, 4, 5, 15, 16, 17, 96, 112, 224, 4096, top // 2 + 1, top,
            rng.randint(0, top)]  # fmt: skip


def crafted_header(rng: random.Random) -> tuple[bytearray, dict]:
    """A header that starts valid and is then broken in one of several ways."""
    fields = {**VALID, "heartbeat": clock(), "capture_time": clock()}
    for _ in range(rng.choice([1, 1, 1, 2, 3])):
        name, _, code = rng.choice(FIELDS)
        fields[name] = rng.choice(edge_values(code, rng))
    data = bytearray(4096)
    for name, offset, code in FIELDS:
        struct.pack_into("<" + code, data, offset, fields[name])
    for index in range(16):
        struct.pack_into("<Q", data, 96 + 8 * index, rng.choice([2, 2, 2, 3, 2**64 - 1]))
    roll = rng.random()
    if roll < 0.1:
        for _ in range(rng.randint(1, 8)):
            data[rng.randrange(224)] ^= 1 << rng.randrange(8)
    elif roll < 0.15:
        data[8:224] = rng.randbytes(216)
    return data, fields


def write_segment(name: str, data: bytes) -> None:
    Path("/dev/shm", name).write_bytes(data)


@pytest.mark.slow
@pytest.mark.skipif(
    not Path("/dev/shm").is_dir(), reason="crafts segments as files in /dev/shm (Linux)"
)
@pytest.mark.timeout(300)
def test_ten_thousand_malformed_segments_are_refused_or_read_whole_never_worse(shm_name):
    rng = random.Random(20261126)
    name = shm_name()
    outcomes: dict[str, int] = {}
    wrong: list[str] = []
    slowest = 0.0
    for _ in range(SEGMENT_CASES):
        header, fields = crafted_header(rng)
        size = 4096 if rng.random() < 0.9 else rng.choice([1, 8, 95, 96, 97, 111, 112, 224, 1000])
        write_segment(name, bytes(header[:size]))
        for leftover in Path("/dev/shm").glob(f"{name}_*"):
            leftover.unlink()
        needed = fields["buffer_count"] * fields["buffer_stride"]
        frame_size = rng.choice(
            [needed, needed, needed, needed + 64, max(needed - 1, 0), needed // 2, 0, None]
        )
        if frame_size is not None and frame_size <= 1 << 20 and 0 < fields["generation"]:
            frame = frame_segment_name(name, fields["generation"])
            write_segment(frame, rng.randbytes(frame_size))
        reader = ShmReader(name)
        started = time.monotonic()
        try:
            for _ in range(2):
                outcome = describe_read(reader.read)
                outcomes[outcome] = outcomes.get(outcome, 0) + 1
                if outcome.startswith("wrong"):
                    wrong.append(f"{outcome} (index {size} B, frame {frame_size} B, {fields})")
            assert reader.connected in (True, False)
        finally:
            reader.close()
        slowest = max(slowest, time.monotonic() - started)
    kinds = Counter(text.partition(" (")[0] for text in wrong)
    assert not wrong, f"{len(wrong)} reads ended badly: {dict(kinds)}; first: {wrong[0]}"
    assert slowest < 1.0, f"one case took {slowest:.2f} s: a read must never wait"
    assert outcomes.get("frame", 0) > 100 and outcomes.get("refused", 0) > 1000, outcomes


def describe_read(read: Callable) -> str:
    """Run one read: 'frame', 'none', 'refused' (ShmError), or 'wrong: ...' for anything else."""
    try:
        got = read()
    except ShmError:
        return "refused"
    except Exception as error:  # the point of the test: nothing else may escape
        return f"wrong: {type(error).__name__}: {error}"
    if got is None:
        return "none"
    pixels, meta = got
    channels = {"rgb": 3, "bgr": 3, "rgba": 4, "bgra": 4}[meta.pixel_format]
    if pixels.dtype != np.uint8 or pixels.shape != (meta.height, meta.width, channels):
        return f"wrong: a frame of {pixels.dtype} {pixels.shape} described as {meta}"
    return "frame"
