"""Fixtures for the runtime: the tiny model, unique shm names, bridge processes cleaned up."""

from __future__ import annotations

import itertools
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from bridge.models import load_components

_names = itertools.count()


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """synthetic:tiny with its tiny VAE, on the CPU."""
    return load_components("synthetic:tiny", vae="tiny", cache_dir=tmp_path_factory.mktemp("m"))


@pytest.fixture
def shm_name() -> Iterator:
    """Stream names no other test uses; leftovers are removed after."""
    made: list[str] = []

    def make() -> str:
        name = f"r{os.getpid() % 100000}n{next(_names)}"
        made.append(name)
        return name

    yield make
    folder = Path("/dev/shm")
    if folder.is_dir():
        for name in made:
            for leftover in [folder / name, *folder.glob(f"{name}_*")]:
                leftover.unlink(missing_ok=True)


@pytest.fixture
def bridge_process(tmp_path) -> Iterator:
    """Start `python -m bridge.cli run ...` as a real process; every one is ended after."""
    started: list[subprocess.Popen] = []
    env = {**os.environ, "SD_BRIDGE_CACHE": str(tmp_path / "cache"), "PYTHONUNBUFFERED": "1"}

    def start(*arguments: str) -> subprocess.Popen:
        process = subprocess.Popen(
            [sys.executable, "-m", "bridge.cli", "run", *arguments],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        started.append(process)
        return process

    yield start
    for process in started:
        if process.poll() is None:
            process.send_signal(signal.SIGKILL)
        process.communicate(timeout=10)
