"""A frame-protocol writer written from docs/shm-protocol.md alone, run as a second process.

It shares no code with bridge/io/shm_protocol.py: segments are files in Linux's /dev/shm mapped
with mmap, and every field is packed where the specification puts it. Tests run it against the
reference reader and writer to check that both follow the text, not each other.

    python spec_peer.py writer NAME WIDTH HEIGHT [--buffers N] [--generation G] [--salt S]
                               [--corrupt] [--frames N]

A writer claims NAME (taking a dead writer's index segment over, as the specification says),
publishes frames whose every byte is `fill(counter, salt)`, prints `ready <json>` after the
first frame and, with --frames, stops after that many frames without closing (as a writer that
dies does). --corrupt then breaks the pixel format field, so the header fails validation.
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import random
import struct
import time
from pathlib import Path

FOLDER = Path("/dev/shm")
INDEX_SIZE = 4096
MAGIC = b"SDBFRAME"
FLAG_CLOSED = 1
STALE = 1.0
FORMAT_RGBA = 2


def fill(counter: int, salt: int) -> int:
    """The value of every byte of frame `counter` of a writer with `salt`."""
    return (counter * 7 + salt * 101) % 251


def _open_map(path: Path, size: int | None = None) -> mmap.mmap:
    fd = os.open(path, os.O_RDWR | (os.O_CREAT | os.O_EXCL if size else 0), 0o600)
    try:
        if size:
            os.ftruncate(fd, size)
        return mmap.mmap(fd, os.fstat(fd).st_size)
    finally:
        os.close(fd)


def _u32(buf, offset: int, value: int | None = None) -> int:
    if value is not None:
        struct.pack_into("<I", buf, offset, value)
    return struct.unpack_from("<I", buf, offset)[0]


def _u64(buf, offset: int, value: int | None = None) -> int:
    if value is not None:
        struct.pack_into("<Q", buf, offset, value)
    return struct.unpack_from("<Q", buf, offset)[0]


def _f64(buf, offset: int, value: float | None = None) -> float:
    if value is not None:
        struct.pack_into("<d", buf, offset, value)
    return struct.unpack_from("<d", buf, offset)[0]


def _owner_fields(buf, buffers: int, magic: bytes) -> None:
    buf[0:8] = magic
    struct.pack_into("<HHII", buf, 8, 1, 96 + 8 * buffers, 0, os.getpid())
    _u32(buf, 20, buffers)
    _f64(buf, 24, time.perf_counter())


def _dead(buf) -> bool:
    """Claiming a name, step 2: whether the index segment's writer is gone."""
    if buf[0:8] == bytes(8):
        return True
    if buf[0:8] != MAGIC:
        raise SystemExit("another program owns the name")
    heartbeat = _f64(buf, 24)
    if _u32(buf, 12) & FLAG_CLOSED or abs(time.perf_counter() - heartbeat) > STALE:
        return True
    try:
        os.kill(_u32(buf, 16), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        pass
    until = time.perf_counter() + STALE
    while time.perf_counter() < until:
        if _f64(buf, 24) != heartbeat:
            raise SystemExit("name already used by a live writer")
        time.sleep(0.02)
    return True


def claim(name: str, buffers: int) -> tuple[mmap.mmap, dict]:
    """Create the index segment, or take a dead writer's over in place; what was found."""
    path = FOLDER / name
    try:
        buf = _open_map(path, INDEX_SIZE)
    except FileExistsError:
        buf = _open_map(path)
        if len(buf) < INDEX_SIZE or not _dead(buf):
            raise SystemExit("cannot take the name over") from None
        found = {
            "seq": _u64(buf, 32),
            "generation": _u32(buf, 40),
            "frame_counter": _u64(buf, 80),
            "buffer_seq": max(_u64(buf, 96 + 8 * i) for i in range(16)),
        }
        seq = found["seq"] + 1 | 1  # odd, and higher
        _u64(buf, 32, seq)
        _owner_fields(buf, buffers, bytes(buf[0:8]))
        buf[40:96] = bytes(56)
        even = found["buffer_seq"] + 2 & ~1
        for i in range(buffers):
            _u64(buf, 96 + 8 * i, even)
        buf[96 + 8 * buffers : INDEX_SIZE] = bytes(INDEX_SIZE - 96 - 8 * buffers)
        _u64(buf, 32, seq + 1)
        buf[0:8] = MAGIC
        if found["generation"]:
            (FOLDER / f"{name}_{found['generation']:08x}").unlink(missing_ok=True)
        return buf, found
    _owner_fields(buf, buffers, bytes(8))
    _u64(buf, 32, 2)
    buf[0:8] = MAGIC
    return buf, {"seq": 0, "generation": 0, "frame_counter": 0, "buffer_seq": 0}


def run_writer(arguments: argparse.Namespace) -> None:
    name, width, height, buffers = (
        arguments.name,
        arguments.width,
        arguments.height,
        arguments.buffers,
    )
    index, found = claim(name, buffers)
    session = random.getrandbits(32) | 1
    generation = arguments.generation or (found["generation"] % 0xFFFFFFFF) + 1
    row_stride = width * 4
    buffer_stride = -(-row_stride * height // 64) * 64
    segment = FOLDER / f"{name}_{generation:08x}"
    segment.unlink(missing_ok=True)
    frames = _open_map(segment, buffers * buffer_stride)
    counter = found["frame_counter"]
    for published in range(arguments.frames or 2**62):
        buffer = published % buffers  # round robin: never the active buffer
        offset = 96 + 8 * buffer
        _u64(index, offset, _u64(index, offset) + 1)
        counter += 1
        value = fill(counter, arguments.salt)
        for row in range(height):
            start = buffer * buffer_stride + row * row_stride
            frames[start : start + row_stride] = bytes([value]) * row_stride
        _u64(index, offset, _u64(index, offset) + 1)
        seq = _u64(index, 32)
        _u64(index, 32, seq + 1)
        struct.pack_into(
            "<IIIIIIQIIQd",
            index,
            40,
            generation,
            width,
            height,
            4,
            FORMAT_RGBA,
            row_stride,
            buffer_stride,
            buffer,
            session,
            counter,
            time.perf_counter(),
        )
        _u64(index, 32, seq + 2)
        _f64(index, 24, time.perf_counter())
        if published == 0:
            report = {"found": found, "generation": generation, "session": session}
            print("ready", json.dumps(report), flush=True)
        time.sleep(0.005)
    if arguments.corrupt:
        seq = _u64(index, 32)
        _u64(index, 32, seq + 1)
        _u32(index, 56, 9)  # no such pixel format
        _u64(index, 32, seq + 2)
    print("done", json.dumps({"frame_counter": counter, "seq": _u64(index, 32)}), flush=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("role", choices=["writer"])
    parser.add_argument("name")
    parser.add_argument("width", type=int)
    parser.add_argument("height", type=int)
    parser.add_argument("--buffers", type=int, default=2)
    parser.add_argument("--generation", type=int, default=0)
    parser.add_argument("--salt", type=int, default=0)
    parser.add_argument("--frames", type=int, default=0)
    parser.add_argument("--corrupt", action="store_true")
    run_writer(parser.parse_args())
