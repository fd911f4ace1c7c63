"""Small helpers shared by the runtime tests."""

from __future__ import annotations

import importlib.util
import json
import os
import queue
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from bridge.control import OscClient
from bridge.io import Frame, Sink, Source, now


def free_port() -> int:
    """A UDP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


ROOT = Path(__file__).resolve().parents[2]


def run_script(
    script: str, arguments: list[str], folder: Path, timeout: float = 300
) -> subprocess.CompletedProcess:
    """`python scripts/<script> <arguments>` from the repository root, with a bridge cache of
    its own in `folder`; the finished process, its output captured as text."""
    return subprocess.run(
        [sys.executable, f"scripts/{script}", *arguments],
        cwd=ROOT,
        env={**os.environ, "SD_BRIDGE_CACHE": str(folder / "cache")},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def load_script(script: str):
    """Import scripts/<script> in this process; the scripts are not part of the package."""
    spec = importlib.util.spec_from_file_location(Path(script).stem, ROOT / "scripts" / script)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_bench(tmp_path: Path, monkeypatch, *arguments: str) -> list[dict]:
    """`sd-bridge bench <arguments> --device cpu` with a cache and an output folder of its own
    under `tmp_path`; the results it wrote to results.json."""
    from bridge.cli import main

    monkeypatch.setenv("SD_BRIDGE_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "bench"
    assert main(["bench", *arguments, "--device", "cpu", "--out", str(out)]) == 0
    return json.loads((out / "results.json").read_text())["results"]


def first_answer(
    client: OscClient, process: subprocess.Popen, name: str, timeout: float = 60.0
) -> tuple | None:
    """Ask a starting bridge for setting `name` until it answers or `timeout` seconds pass,
    then drop the late answers to the asks sent meanwhile; the first answer, None if none came.

    Fails the test, with the bridge's standard error, if the process ends first.
    """
    deadline = time.monotonic() + timeout
    reply = None
    while reply is None and time.monotonic() < deadline:
        assert process.poll() is None, process.communicate()[1]
        client.send("/sd/get", name)
        reply = client.receive(0.2)
    while client.receive(0.5) is not None:
        pass
    return reply


class LocalSource(Source):
    """A source inside the test process: always there, nothing to open. Subclasses say `_read`
    and name themselves in `label`."""

    label = "local"

    @property
    def connected(self) -> bool:
        return True

    def describe(self) -> str:
        return self.label

    def _open(self) -> None:
        pass

    def _close(self) -> None:
        pass


class FedSource(LocalSource):
    """Hands out exactly the frames a test puts in, when it puts them: the n-th fed frame is a
    flat `side`-pixel square of level `level(n)`, with n as its frame number."""

    def __init__(
        self, side: int, label: str = "fed", level: Callable[[int], int] = lambda n: n % 256
    ) -> None:
        super().__init__()
        self.side = side
        self.label = label
        self.level = level
        self.frames: queue.Queue[Frame] = queue.Queue()
        self.fed = 0

    def feed(self) -> None:
        pixels = np.full((self.side, self.side, 3), self.level(self.fed), np.uint8)
        self.frames.put(Frame(pixels, "rgb", now(), self.fed))
        self.fed += 1

    def _read(self, timeout: float) -> Frame | None:
        try:
            return self.frames.get(timeout=timeout)
        except queue.Empty:
            return None


class RecordingSink(Sink):
    """Keeps every frame written to it, in order."""

    def __init__(self) -> None:
        super().__init__()
        self.frames: list[Frame] = []

    @property
    def connected(self) -> bool:
        return True

    def describe(self) -> str:
        return "recorder"

    def _open(self) -> None:
        pass

    def _close(self) -> None:
        pass

    def _write(self, frame: Frame) -> None:
        self.frames.append(frame)
