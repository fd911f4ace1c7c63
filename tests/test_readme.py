"""The README's promises: its Python example runs as written, its commands exist."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", README.read_text(), flags=re.S)


def test_the_python_example_runs_as_written(tmp_path):
    (example,) = blocks("python")
    result = subprocess.run(
        [sys.executable, "-c", example],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
        env={**os.environ, "SD_BRIDGE_CACHE": str(tmp_path)},
    )
    assert result.returncode == 0, result.stderr
    assert "(64, 64, 3) uint8" in result.stdout


def test_every_sd_bridge_command_in_the_readme_parses():
    from bridge.cli import build_parser

    lines = [
        line
        for block in blocks("bash")
        for line in block.splitlines()
        if line.startswith("sd-bridge ")
    ]
    assert len(lines) >= 3
    parser = build_parser()
    for line in lines:
        args = parser.parse_args(shlex.split(line)[1:])
        assert callable(args.func)
