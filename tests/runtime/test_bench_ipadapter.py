"""The IP-Adapter bench cases: SD-Turbo with its real-shape adapter on a GPU, tiny on the CPU."""

from __future__ import annotations

from bridge.runtime.bench import CPU_SMOKE_CASES, GPU_CASES
from tests.runtime.helpers import run_bench


def test_the_ip_adapter_smoke_case_times_frames_and_a_new_picture_on_the_cpu(
    tmp_path, capsys, monkeypatch
):
    arguments = ["--cases", "tiny-img2img-ipadapter", "--frames", "2", "--warmup", "1"]
    (result,) = run_bench(tmp_path, monkeypatch, *arguments)
    assert (result["implementation"], result["accel"], result["error"]) == ("ours", "none", "")
    assert result["fps"] > 0 and result["extra"]["style_embed_ms"] > 0
    printed = capsys.readouterr().out
    assert "| tiny img2img 1 step, IP-Adapter | ours | none |" in printed
    assert "a new IP-Adapter picture encodes in" in printed


def test_the_gpu_case_is_sd_turbo_one_step_at_512_with_the_sd_turbo_adapter():
    case = GPU_CASES["turbo-img2img-ipadapter"]
    assert (case.model, case.mode, case.t_index_list, case.cfg_type) == (
        "synthetic:sd-turbo",
        "img2img",
        (32,),
        "none",
    )
    assert (case.width, case.height, case.ip_adapter) == (512, 512, True)
    assert CPU_SMOKE_CASES["tiny-img2img-ipadapter"].ip_adapter
