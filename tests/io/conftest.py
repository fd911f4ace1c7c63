"""Fixtures of the transport tests: unique shared-memory names, the peer process, test media."""

from __future__ import annotations

import importlib.util
import itertools
import os
import subprocess
import sys
from collections.abc import Iterator
from fractions import Fraction
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest

PEER_SCRIPT = Path(__file__).with_name("shm_peer.py")
_names = itertools.count()

_VIDEO_COLOURS = [(200, 30, 30), (30, 200, 30), (30, 30, 200), (220, 220, 40), (40, 220, 220)]


@pytest.fixture
def shm_name() -> Iterator[str]:
    """A stream name no other test uses; segments a killed writer left are removed after."""
    name = f"t{os.getpid() % 100000}n{next(_names)}"
    yield name
    shm_folder = Path("/dev/shm")
    if shm_folder.is_dir():
        for leftover in [shm_folder / name, *shm_folder.glob(f"{name}_*")]:
            leftover.unlink(missing_ok=True)


@pytest.fixture(scope="session")
def peer() -> ModuleType:
    """tests/io/shm_peer.py as a module: frame makers and checkers shared with the peer."""
    spec = importlib.util.spec_from_file_location("shm_peer", PEER_SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def peer_processes(script: Path) -> Iterator:
    """Start `script` in fresh Python processes; every process started is ended after."""
    started: list[subprocess.Popen] = []

    def start(*arguments: object) -> subprocess.Popen:
        process = subprocess.Popen(
            [sys.executable, str(script), *map(str, arguments)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        started.append(process)
        return process

    yield start
    for process in started:
        if process.poll() is None:
            process.kill()
        process.communicate(timeout=10)


@pytest.fixture
def start_peer() -> Iterator:
    """Start shm_peer.py in a fresh Python process; every process started is ended after."""
    yield from peer_processes(PEER_SCRIPT)


@pytest.fixture
def start_ndi_peer() -> Iterator:
    """Start ndi_peer.py in a fresh Python process; every process started is ended after."""
    yield from peer_processes(PEER_SCRIPT.with_name("ndi_peer.py"))


@pytest.fixture
def video_colours() -> list[tuple[int, int, int]]:
    """The RGB colours of the frames of `tiny_video`, in order."""
    return list(_VIDEO_COLOURS)


@pytest.fixture
def tiny_video(tmp_path: Path) -> Path:
    """A 64x48, 30 fps MPEG-4 file of five solid-colour frames (`video_colours`)."""
    av = pytest.importorskip("av")
    path = tmp_path / "colours.mp4"
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("mpeg4", rate=Fraction(30))
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        stream.options = {"qscale": "2"}
        for index, colour in enumerate(_VIDEO_COLOURS):
            frame = av.VideoFrame.from_ndarray(
                np.full((48, 64, 3), colour, np.uint8), format="rgb24"
            )
            frame.pts = index
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)
    return path
