"""The SDXL bench cases without CUDA: tiny-xl runs diffusers' SDXL baseline and ours."""

from __future__ import annotations

from bridge.runtime.bench import CPU_SMOKE_CASES, GPU_CASES, Result, table
from tests.runtime.helpers import run_bench


def test_the_sdxl_smoke_case_runs_the_diffusers_baseline_and_ours_on_the_cpu(
    tmp_path, capsys, monkeypatch
):
    arguments = ["--cases", "tinyxl-img2img", "--accel", "cudagraph"]
    arguments += ["--frames", "2", "--warmup", "1", "--no-original"]
    results = run_bench(tmp_path, monkeypatch, *arguments)
    assert [(r["implementation"], r["accel"]) for r in results] == [
        ("diffusers", "none"),
        ("ours", "none"),
    ]
    assert all(r["fps"] > 0 and not r["error"] and r["peak_memory_mb"] == 0 for r in results)
    printed = capsys.readouterr().out
    assert "accel cudagraph needs CUDA; on cpu only accel none runs" in printed
    assert "| tiny-xl img2img 1 step | ours | none |" in printed


def test_the_sdxl_gpu_cases_measure_against_diffusers_and_sdxs_against_the_original():
    assert GPU_CASES["sdxl-turbo-img2img"].baseline == "diffusers-xl"
    assert (
        GPU_CASES["sdxl-turbo-img2img-1024"].width,
        GPU_CASES["sdxl-turbo-img2img-1024"].height,
    ) == (1024, 1024)
    assert GPU_CASES["sdxs-img2img"].baseline == "original"
    assert CPU_SMOKE_CASES["tinyxl-img2img"].model == "synthetic:tiny-xl"


def test_the_table_compares_our_runs_with_the_diffusers_baseline_and_shows_peak_memory():
    runs = [
        Result("xl", "diffusers", "none", 10, 20.0, 50.0, 60.0, 50.0, 0.1, peak_memory_mb=9000),
        Result("xl", "ours", "cudagraph", 10, 80.0, 12.5, 13.0, 12.5, 0.1, peak_memory_mb=7000),
    ]
    lines = table(runs).splitlines()
    assert lines[2].endswith("| 9000 | 1.00x |")
    assert lines[3].endswith("| 7000 | 4.00x |")
