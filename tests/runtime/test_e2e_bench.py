"""`scripts/e2e_bench.py` as a smoke run: synthetic:tiny on the CPU, each phase briefly.

The figures themselves mean nothing here; the test checks that the script runs a real bridge
through every phase asked for and reports what the GPU run is read for.
"""

from __future__ import annotations

import json

import pytest

from tests.runtime.helpers import run_script

pytestmark = pytest.mark.slow


def test_the_e2e_bench_measures_each_input_rate_and_the_prompt_churn(tmp_path):
    figures = tmp_path / "e2e.json"
    arguments = [
        "--model", "synthetic:tiny", "--accel", "none", "--size", "64", "--input-fps", "30,0",
        "--seconds", "1.5", "--settle", "0.3", "--json", str(figures),
    ]  # fmt: skip
    done = run_script("e2e_bench.py", arguments, tmp_path)
    assert done.returncode == 0, done.stderr
    report = json.loads(figures.read_text())
    phases = report["phases"]
    assert [phase["input_fps"] for phase in phases] == [30.0, 0.0, 0.0]
    assert [phase.get("prompt_every_frame", False) for phase in phases] == [False, False, True]
    for phase in phases:
        assert phase["input_frames"] > 0 and phase["frames"] > 0
        assert phase["latency_p50_ms"] > 0  # output arrived after its input's capture time
        assert phase["bridge_step_ms"] > 0  # read from the bridge's status line
        assert phase["goals"]  # judged against the bridge's step
    assert report["first_frame_s"] > 0
