"""The ControlNet bench cases without CUDA: tiny with a canny ControlNet, and canny alone."""

from __future__ import annotations

from bridge.runtime.bench import CONTROLNETS, CPU_SMOKE_CASES, GPU_CASES
from tests.runtime.helpers import run_bench


def test_the_controlnet_smoke_cases_run_the_pipeline_and_the_preprocessor_on_the_cpu(
    tmp_path, capsys, monkeypatch
):
    cases = ["--cases", "tiny-img2img-controlnet,canny-64"]
    results = run_bench(tmp_path, monkeypatch, *cases, "--frames", "2", "--warmup", "1")
    assert [(r["case"], r["implementation"], r["accel"]) for r in results] == [
        ("tiny img2img 1 step, 1 ControlNet (canny)", "ours", "none"),
        ("canny preprocessor 64x64", "ours", "none"),
    ]
    assert all(r["fps"] > 0 and not r["error"] and r["frames"] == 2 for r in results)
    assert results[0]["extra"]["controlnets"] == 1 and results[0]["extra"]["pipelined_fps"] > 0
    printed = capsys.readouterr().out
    assert printed.count("loading ") == 1  # the preprocessor runs without a model


def test_the_gpu_cases_run_sd_turbo_with_one_and_two_real_shaped_controlnets():
    one, two = GPU_CASES["turbo-img2img-controlnet"], GPU_CASES["turbo-img2img-2controlnet"]
    for case in (one, two):
        assert (case.model, case.t_index_list, case.width, case.height) == (
            "synthetic:sd-turbo",
            (32,),
            512,
            512,
        )
        assert CONTROLNETS[case.model] == "synthetic:controlnet-sd-turbo"
    assert (one.controlnets, two.controlnets) == (("canny",), ("canny", "passthrough"))
    assert GPU_CASES["canny-512"].preprocessor and CPU_SMOKE_CASES["canny-64"].preprocessor
