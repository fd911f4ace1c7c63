"""What `sd-bridge run` says while it starts: the acceleration it picked and why, and how long it
took to the first frame out. One real process on the CPU serves the tests of what it prints; the
metrics that time the first frame are checked on their own."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from bridge.io import now
from bridge.runtime.metrics import Metrics

TINY = ("--model", "synthetic:tiny", "--width", "64", "--height", "64")


@pytest.fixture(scope="module")
def cpu_start(tmp_path_factory) -> list[str]:
    """The lines a start on the CPU with the default accel prints, until it stops after three
    frames. Its settings file asks for a compile scope and live compiling, which accel none
    cannot use."""
    cache = tmp_path_factory.mktemp("start")
    config = cache / "settings.toml"
    config.write_text('compile_scope = "blocks"\nlive_compile = false\nbackground_compile = true\n')
    arguments = [*TINY, "--device", "cpu", "--output", "null", "--frames", "3", "--no-osc"]
    arguments += ["--config", str(config)]
    result = subprocess.run(
        [sys.executable, "-m", "bridge.cli", "run", *arguments],
        capture_output=True,
        text=True,
        timeout=180,
        env={**os.environ, "SD_BRIDGE_CACHE": str(cache)},
    )
    assert result.returncode == 0, result.stderr
    return result.stderr.splitlines()


def test_the_default_accel_on_the_cpu_is_none_said_once_with_why(cpu_start):
    said = [line for line in cpu_start if line.startswith("accel")]
    assert said == [
        "accel: none (the pipeline runs on cpu; CUDA graphs and compile need a CUDA GPU)"
    ]


def test_compile_settings_without_compile_are_said_to_have_no_effect(cpu_start):
    accel = next(i for i, line in enumerate(cpu_start) if line.startswith("accel"))
    note = (
        'compile scope "blocks", live compile off and background compile on have no effect: '
        "accel is none, not compile."
    )
    assert cpu_start[accel + 1] == f"note: {note}"
    assert "compiling" not in cpu_start[accel]


def test_the_first_frame_out_is_timed_from_the_start_once(cpu_start):
    timed = [i for i, line in enumerate(cpu_start) if line.startswith("first frame after")]
    assert len(timed) == 1
    (index,) = timed
    assert re.fullmatch(r"first frame after \d+\.\d s", cpu_start[index])
    running = next(i for i, line in enumerate(cpu_start) if line.startswith("running:"))
    stopped = next(i for i, line in enumerate(cpu_start) if line.startswith("stopped after"))
    assert running < index < stopped


def test_metrics_time_the_first_frame_from_the_start_and_tell_it_once():
    told: list[float] = []
    started = now() - 5.0  # a start five seconds ago: the first frame is at least that late
    metrics = Metrics(started=started, on_first_frame=told.append)
    assert metrics.status().first_frame_s is None
    for _ in range(3):
        metrics.frame_done(0.01)
    assert len(told) == 1 and 5.0 <= told[0] <= now() - started
    assert metrics.status().first_frame_s == told[0]


def test_metrics_without_a_start_time_time_no_first_frame():
    metrics = Metrics()
    metrics.frame_done(0.01)
    assert metrics.status().first_frame_s is None
