"""`sd-bridge bench` without CUDA: a smoke run on synthetic:tiny that exercises the whole path."""

from __future__ import annotations

import json

import torch
from PIL import Image
from torch._dynamo.eval_frame import _debug_get_cache_entry_list

from bridge.cli import main
from bridge.runtime.bench import Result, _release, our_runs, table


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


def test_compile_runs_once_per_scope_and_other_accels_once():
    assert our_runs(["none", "cudagraph", "compile"], ["default", "fp8"], ["model", "blocks"]) == [
        ("none", "default", "model"),
        ("none", "fp8", "model"),
        ("cudagraph", "default", "model"),
        ("cudagraph", "fp8", "model"),
        ("compile", "default", "model"),
        ("compile", "default", "blocks"),
        ("compile", "fp8", "model"),
        ("compile", "fp8", "blocks"),
    ]


def test_a_run_is_labelled_with_its_scope_and_precision_where_not_the_default():
    run = Result("a", "ours", "compile", 10, 120.0, 8.3, 9.0, 8.3, 0.1)
    assert run.label == "compile"
    run.compile_scope, run.precision = "blocks", "fp8"
    assert run.label == "compile blocks fp8"
    assert "| a | ours | compile blocks fp8 | 120.0 |" in table([run])


def test_an_unknown_compile_scope_is_refused_in_one_sentence(tmp_path, capsys):
    code = main(
        ["bench", "--device", "cpu", "--cases", "tiny-txt2img", "--compile-scope", "layers"]
        + ["--out", str(tmp_path)]
    )
    assert code == 2
    assert (
        capsys.readouterr()
        .err.strip()
        .endswith("sd-bridge: unknown compile scope 'layers'; choose from model, blocks.")
    )


def _plus_one(x):
    return x + 1


def test_each_run_starts_without_the_traces_of_the_run_before():
    """Dynamo keeps its traces per Python function for the whole process; a run must neither
    reuse a previous run's nor count them against its recompile limit."""
    torch.compile(_plus_one, backend="eager")(torch.ones(2))
    assert len(_debug_get_cache_entry_list(_plus_one.__code__)) == 1
    _release(torch.device("cpu"))
    assert _debug_get_cache_entry_list(_plus_one.__code__) == []
