"""`scripts/start_probe.py` as a smoke run: synthetic:tiny on the CPU, uncompiled.

The figures mean nothing here; the test checks that every phase a GPU run is read for is
reported, in the JSON file as well as on the way.
"""

from __future__ import annotations

import json

from tests.runtime.helpers import run_script


def test_the_start_probe_times_each_phase_and_the_frames_after(tmp_path):
    figures = tmp_path / "start.json"
    arguments = [
        "--model", "synthetic:tiny", "--size", "64", "--accel", "none",
        "--compile-scope", "blocks", "--frames", "4", "--json", str(figures),
    ]  # fmt: skip
    done = run_script("start_probe.py", arguments, tmp_path)
    assert done.returncode == 0, done.stderr
    report = json.loads(figures.read_text())
    assert report["settings"]["compile_scope"] == "blocks"
    phases = ["import_s", "load_s", "accelerate_s", "frame0_s", "frame1_s", "frame2_s"]
    assert all(report[phase] > 0 for phase in phases)
    assert report["to_third_frame_s"] >= sum(report[phase] for phase in phases)
    assert report["dynamo_graphs"] == 0  # accel none traces nothing
    assert report["fps_back_to_back"] > 0
    assert "fps_back_to_back: " in done.stdout
