"""The other process of the shared-memory tests: a writer or a reader, run as a script.

It loads bridge/io/shm_protocol.py by its file path, not through the `bridge` package, so the
tests also show that the protocol file works on its own, as it must inside TouchDesigner or OBS.

    python shm_peer.py writer NAME WIDTH HEIGHT FPS
    python shm_peer.py reader NAME SECONDS
"""

from __future__ import annotations

import importlib.util
import json
import sys
import time
from itertools import pairwise
from pathlib import Path

import numpy as np

PROTOCOL_FILE = Path(__file__).resolve().parents[2] / "bridge" / "io" / "shm_protocol.py"


def load_protocol():
    """The protocol module, loaded from its file alone."""
    spec = importlib.util.spec_from_file_location("shm_protocol_standalone", PROTOCOL_FILE)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while building classes
    spec.loader.exec_module(module)
    return module


def make_frame(counter: int, height: int, width: int, channels: int = 4) -> np.ndarray:
    """A frame whose every byte follows from `counter`, so a torn frame cannot pass `is_whole`.

    The body is filled with counter % 251; the last row starts with the counter as 8 bytes and
    is filled with the body value inverted.
    """
    fill = counter % 251
    pixels = np.full((height, width, channels), fill, np.uint8)
    last_row = pixels[-1].reshape(-1)
    last_row[:] = 255 - fill
    last_row[:8] = np.frombuffer(counter.to_bytes(8, "little"), np.uint8)
    return pixels


def is_whole(pixels: np.ndarray, counter: int) -> bool:
    """True when `pixels` is exactly `make_frame(counter, ...)`."""
    height, width, channels = pixels.shape
    return bool(np.array_equal(pixels, make_frame(counter, height, width, channels)))


def run_writer(name: str, width: int, height: int, fps: float) -> None:
    protocol = load_protocol()
    writer = protocol.ShmWriter(name, width, height, "rgba")
    counter = 0
    while True:
        counter = writer.write(make_frame(counter + 1, height, width))
        if counter == 1:
            print("ready", flush=True)
        time.sleep(1.0 / fps)


def run_reader(name: str, seconds: float) -> None:
    protocol = load_protocol()
    reader = protocol.ShmReader(name)
    deadline = time.monotonic() + 10.0
    while not reader.connected:
        if time.monotonic() > deadline:
            raise SystemExit(f"no writer appeared under {name!r}")
        time.sleep(0.01)
    counters: list[int] = []
    torn = 0
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        got = reader.read()
        if got is None:
            continue
        pixels, meta = got
        counters.append(meta.frame_counter)
        if not is_whole(pixels, meta.frame_counter):
            torn += 1
    reader.close()
    increasing = all(a < b for a, b in pairwise(counters))
    print(
        json.dumps(
            {
                "frames": len(counters),
                "torn": torn,
                "increasing": increasing,
                "last": counters[-1] if counters else 0,
            }
        )
    )


if __name__ == "__main__":
    role, stream = sys.argv[1], sys.argv[2]
    if role == "writer":
        run_writer(stream, int(sys.argv[3]), int(sys.argv[4]), float(sys.argv[5]))
    else:
        run_reader(stream, float(sys.argv[3]))
