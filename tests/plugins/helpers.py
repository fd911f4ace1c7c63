"""Helpers shared by the plugin tests: repository paths, free ports, required programs."""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
from dataclasses import fields
from pathlib import Path

import pytest

from bridge.cli import build_parser
from bridge.runtime.settings import RunSettings, merge

ROOT = Path(__file__).resolve().parents[2]
TOE = ROOT / "toe"
OBS_PLUGIN = ROOT / "plugins" / "obs"
MUSIC = ROOT / "plugins" / "music"


def free_udp_port() -> int:
    """A UDP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def free_tcp_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def bridge_run_available() -> bool:
    """Whether `python -m bridge.cli run` exists in this checkout."""
    done = subprocess.run(
        [sys.executable, "-m", "bridge.cli", "run", "--help"],
        capture_output=True,
        cwd=ROOT,
        timeout=60,
        check=False,
    )
    return done.returncode == 0


def require_program(name: str, package: str) -> str:
    """The path of an installed program, or skip naming the Debian package that provides it."""
    found = shutil.which(name)
    if found is None:
        pytest.skip(f"{name} is not installed; install the Debian package {package}")
    return found


def parsed_run_settings(command: list[str]) -> RunSettings:
    """What `sd-bridge run` makes of a command line, through its own parser and settings."""
    assert command[1:4] == ["-m", "bridge.cli", "run"]
    args = build_parser().parse_args(command[3:])
    overrides = {field.name: getattr(args, field.name, None) for field in fields(RunSettings)}
    return merge({}, overrides)
