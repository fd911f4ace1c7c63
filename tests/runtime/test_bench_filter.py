"""The similarity-filter bench cases: the filter decides on every frame and skips none."""

from __future__ import annotations

from bridge.runtime.bench import CPU_SMOKE_CASES, GPU_CASES
from tests.runtime.helpers import run_bench


def test_the_filter_smoke_case_decides_on_every_frame_and_skips_none(tmp_path, monkeypatch):
    arguments = ["--cases", "tiny-img2img-filter", "--frames", "6", "--warmup", "2"]
    (result,) = run_bench(tmp_path, monkeypatch, *arguments)
    assert (result["implementation"], result["error"]) == ("ours", "")
    # Three set-up frames, two warm-up frames and six timed ones, each a new picture: a filter
    # that saw the same picture twice in a row would skip.
    assert result["extra"]["frames_skipped"] == 0
    # ... and it did compare them (0.0 is the value before any comparison): two independent
    # random pictures, centred on 0 as the VAE takes them, are nearly orthogonal.
    similarity = result["extra"]["last_similarity"]
    assert similarity != 0.0 and abs(similarity) < 0.2
    assert result["fps"] > 0


def test_the_gpu_filter_case_is_the_plain_one_step_case_with_the_filter_on():
    filtered, plain = GPU_CASES["turbo-img2img-filter"], GPU_CASES["turbo-img2img"]
    assert filtered.similarity_filter and not plain.similarity_filter
    assert filtered.config().similarity_filter
    same = ("model", "mode", "t_index_list", "cfg_type", "width", "height", "frame_buffer_size")
    assert all(getattr(filtered, name) == getattr(plain, name) for name in same)
    assert CPU_SMOKE_CASES["tiny-img2img-filter"].config().similarity_filter
