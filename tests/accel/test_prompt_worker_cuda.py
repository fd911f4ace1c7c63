"""The prompt worker on its own CUDA stream: SDXL's empty negative prompt as the pipeline has it.

On a GPU the engine encodes live prompt changes on a second CUDA stream; with the model's
``force_zeros_for_empty_prompt`` the empty negative prompt must come out as zeros there too, and
the prompt "" as its encoding (tests/stream/test_sdxl.py checks the CPU path against diffusers).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from bridge.runtime.prompts import PromptWorker
from bridge.stream import StreamConfig, StreamDiffusion
from tests.accel.helpers import SIZE, load_tiny
from tests.control.helpers import wait_until


@pytest.fixture(scope="module")
def tiny_xl_cuda(tmp_path_factory):
    return load_tiny("cuda", tmp_path_factory.mktemp("synthetic"), "tiny-xl")


@pytest.mark.gpu
@pytest.mark.parametrize("force_zeros", [True, False])
def test_the_worker_gives_zeros_for_the_empty_negative_prompt_only_with_the_flag(
    tiny_xl_cuda, force_zeros
):
    components = dataclasses.replace(tiny_xl_cuda, force_zeros_for_empty_prompt=force_zeros)
    config = StreamConfig(width=SIZE, height=SIZE, t_index_list=(45,), cfg_type="full")
    stream = StreamDiffusion(components, config, prompt="a forest", negative_prompt="fog")
    worker = PromptWorker(stream.encode_prompt, stream.device)
    worker.start()
    try:
        worker.request("", "", 0.0)
        taken = []
        assert wait_until(lambda: taken.append(worker.take()) or taken[-1] is not None, 30)
    finally:
        worker.stop()
    encoded = taken[-1]
    encoded.wait()
    torch.cuda.synchronize()
    assert encoded.ready is not None and encoded.cond.device.type == "cuda"
    assert encoded.cond.count_nonzero() > 0
    torch.testing.assert_close(encoded.cond, stream.encode_prompt(""))
    if force_zeros:
        assert encoded.uncond.count_nonzero() == 0
    else:
        torch.testing.assert_close(encoded.uncond, encoded.cond)
