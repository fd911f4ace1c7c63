"""`sd-bridge bench` without CUDA: a smoke run on synthetic:tiny that exercises the whole path."""

from __future__ import annotations

import json

from PIL import Image

from bridge.cli import main
from bridge.runtime.bench import Result, table


def test_the_cpu_smoke_bench_writes_json_a_chart_and_a_table(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("SD_BRIDGE_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "bench"
    code = main(["bench", "--device", "cpu", "--frames", "3", "--warmup", "1", "--out", str(out)])
    assert code == 0
    report = json.loads((out / "results.json").read_text())
    assert report["device"].startswith("CPU")
    cases = {r["case"] for r in report["results"]}
    assert cases == {"tiny img2img [32, 45] RCFG self", "tiny txt2img 1 step"}
    for result in report["results"]:
        assert result["implementation"] == "ours" and result["fps"] > 0 and not result["error"]
        assert result["frames"] == 3
    assert Image.open(out / "chart.png").size[0] > 100
    printed = capsys.readouterr().out
    assert "| tiny img2img [32, 45] RCFG self | ours | none |" in printed
    assert "the original StreamDiffusion is skipped: it needs CUDA" in printed


def test_the_table_gives_each_run_its_ratio_to_the_original_of_the_same_case():
    runs = [
        Result("a", "original", "none", 10, 40.0, 25.0, 30.0, 25.0, 0.1),
        Result("a", "ours", "cudagraph", 10, 120.0, 8.3, 9.0, 8.3, 0.1),
        Result("b", "ours", "none", 10, 50.0, 20.0, 21.0, 20.0, 0.1),
    ]
    lines = table(runs).splitlines()
    assert lines[2].endswith("| 1.00x |")
    assert lines[3].endswith("| 3.00x |")
    assert lines[4].endswith("|  |")  # no original ran for case b
