"""`scripts/start_probe.py` as a smoke run: synthetic:tiny on the CPU, uncompiled, in this
process.

The figures mean nothing here; the test checks that everything a GPU run is read for is
reported, in the JSON file as well as on the way.
"""

from __future__ import annotations

import json

from tests.runtime.helpers import load_script


def test_the_start_probe_times_each_phase_then_the_frames_after_each_live_change(tmp_path, capsys):
    figures = tmp_path / "start.json"
    arguments = [
        "--model", "synthetic:tiny", "--size", "64", "--accel", "none", "--device", "cpu",
        "--compile-scope", "blocks", "--frames", "4", "--changes", "--json", str(figures),
    ]  # fmt: skip
    assert load_script("start_probe.py").main(arguments) == 0
    printed = capsys.readouterr().out
    report = json.loads(figures.read_text())
    assert report["settings"]["compile_scope"] == "blocks"
    assert report["import_s"] >= 0  # torch and the bridge are imported already in this process
    phases = ["load_s", "accelerate_s", "frame0_s", "frame1_s", "frame2_s"]
    assert all(report[phase] > 0 for phase in phases)
    assert report["to_third_frame_s"] >= sum(report[phase] for phase in phases)
    assert report["dynamo_graphs"] == 0  # accel none traces nothing
    assert report["fps_back_to_back"] > 0
    assert "fps_back_to_back: " in printed

    names = [entry["change"] for entry in report["changes"]]
    assert names[:2] == ["feature bank on", "feature bank off"]
    assert names[-4:] == ["192x192", "64x64 again", "192x192 again", "64x64 once more"]
    for entry in report["changes"]:
        assert entry["first_frame_s"] > 0 and entry["steady_ms"] > 0
        assert entry["graphs_traced"] == 0 and entry["captures"] == 0  # accel none
    # The resolution changes really resized the frames that came out.
    shapes = [entry["output_shape"] for entry in report["changes"]]
    assert shapes[-4:] == [[1, 192, 192, 3], [1, 64, 64, 3], [1, 192, 192, 3], [1, 64, 64, 3]]
    assert shapes[0] == [1, 64, 64, 3]
    assert '"change": "64x64 once more"' in printed
