"""The `precision` start setting through `sd-bridge run` and `sd-bridge bench` on a machine without
float8 products (this one: a CPU). The float8 path itself is tested in tests/accel."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from bridge.accel import fp8
from bridge.accel.fp8 import EVERY_LAYER
from bridge.cli import main

ROOT = Path(__file__).resolve().parents[2]

REFUSAL = (
    "sd-bridge: --precision fp8 needs an NVIDIA GPU of compute capability 8.9 or newer (Ada, "
    "Hopper, Blackwell), but the pipeline runs on cpu; use --precision default."
)


def test_run_with_fp8_on_the_cpu_is_refused_in_one_sentence_before_the_model_loads() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "bridge.cli", "run", "--model", "synthetic:tiny", "--precision"]
        + ["fp8", "--width", "64", "--height", "64", "--output", "null", "--no-osc"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    assert result.returncode == 2
    # One line: no "loading ..." before it, so the refusal came before the model load.
    assert result.stderr.strip() == REFUSAL


def bench(tmp_path, precisions: str) -> tuple[int, list[dict]]:
    out = tmp_path / "bench"
    code = main(
        ["bench", "--device", "cpu", "--cases", "tiny-txt2img", "--precision", precisions]
        + ["--frames", "2", "--warmup", "1", "--out", str(out)]
    )
    return code, json.loads((out / "results.json").read_text())["results"]


def test_bench_runs_fp8_beside_the_default_and_reports_its_layers_and_distance(
    tmp_path, capsys, monkeypatch
) -> None:
    monkeypatch.setenv("SD_BRIDGE_CACHE", str(tmp_path / "cache"))
    # The CPU stands in for an FP8 GPU (torch._scaled_mm runs here), and every layer of the tiny
    # model stands in for the large layers of a real one.
    monkeypatch.setattr(fp8, "check_fp8", lambda *args: None)
    monkeypatch.setattr(fp8, "Fp8Rule", lambda: EVERY_LAYER)
    code, results = bench(tmp_path, "default,fp8")
    assert code == 0
    assert [(r["accel"], r["precision"]) for r in results] == [("none", "default"), ("none", "fp8")]
    assert all(r["fps"] > 0 and not r["error"] for r in results)
    assert "fp8" not in results[0]["extra"]
    report = results[1]["extra"]["fp8"]
    assert report["converted"] == len(report["layers"]) == 63
    assert sum(report["by_group"].values()) == 63
    assert "down_blocks.0.attentions.0.transformer_blocks.0.ff.net.2" in report["layers"]
    # Measured against the model as loaded, which the fp8 run left as it was.
    assert 0.99 < report["latent_cosine"] < 1.0
    assert 0 < report["latent_max_abs"] < report["reference_max_abs"]
    assert "| tiny txt2img 1 step | ours | none fp8 |" in capsys.readouterr().out
