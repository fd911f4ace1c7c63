"""The text encoders replayed as a CUDA graph: the eager embeddings, for SD-shaped and SDXL-shaped
encoders, from any thread and stream, and a different embedding for a different prompt (so that
a replay of stale ids fails). What is not GPU work (the split into host token ids and device
embedding, the hook, the fallbacks) is checked on the CPU."""

from __future__ import annotations

import logging
import threading
import time

import pytest
import torch

from bridge.accel import accelerate, text_graph
from bridge.accel.text_graph import GraphedTextEncoders, graph_text_encoders
from bridge.models import load_components
from bridge.runtime.prompts import PromptWorker
from bridge.stream import PromptEncoder, StreamConfig, StreamDiffusion

PROMPTS = ["a forest", "a desert at noon", "", "neon jellyfish, " * 30]  # the last is cut at 77
# fp16 text encoders: the graph replays the eager kernels, so the results agree to fp16 rounding.
TOLERANCE = 2e-3


def load(name: str, device: str, dtype: torch.dtype, cache) -> object:
    return load_components(
        f"synthetic:{name}", vae="tiny", device=device, dtype=dtype, cache_dir=cache
    )


@pytest.fixture(scope="module")
def tiny_cpu(tmp_path_factory):
    return load("tiny", "cpu", torch.float32, tmp_path_factory.mktemp("m"))


@pytest.fixture(scope="module", params=["tiny", "tiny-xl"])
def cuda_stream(request, tmp_path_factory):
    """An fp16 pipeline on the GPU, SD-shaped (one encoder) or SDXL-shaped (two, packed)."""
    components = load(request.param, "cuda", torch.float16, tmp_path_factory.mktemp("m"))
    return StreamDiffusion(components, StreamConfig(width=64, height=64), prompt="a forest")


def eager(encoder: PromptEncoder, prompt: str) -> torch.Tensor:
    return encoder.embed_ids(encoder.token_ids(prompt))


# ------------------------------------------------------------------------------ on the CPU


def test_token_ids_stay_on_the_host_at_the_tokenizers_fixed_length(tiny_cpu):
    encoder = PromptEncoder(tiny_cpu.tokenizer, tiny_cpu.text_encoder)
    for prompt in ("a", PROMPTS[-1]):
        (ids,) = encoder.token_ids(prompt)
        assert ids.device.type == "cpu" and tuple(ids.shape) == (1, 77)
    assert not torch.equal(encoder.token_ids("a")[0], encoder.token_ids("b")[0])


def test_new_prompts_go_through_the_accelerator_and_are_cached(tiny_cpu):
    encoder = PromptEncoder(tiny_cpu.tokenizer, tiny_cpu.text_encoder)
    seen: list[list[torch.Tensor]] = []

    def accelerator(ids):
        seen.append(ids)
        return encoder.embed_ids(ids)

    encoder.accelerator = accelerator
    first = encoder("a forest")
    encoder("a desert at noon")
    assert encoder("a forest") is first
    assert len(seen) == 2
    assert torch.equal(seen[0][0], encoder.token_ids("a forest")[0])
    torch.testing.assert_close(first, eager(encoder, "a forest"))


def test_a_cpu_encoder_stays_eager(tiny_cpu):
    encoder = PromptEncoder(tiny_cpu.tokenizer, tiny_cpu.text_encoder)
    assert graph_text_encoders(encoder) is False
    assert encoder.accelerator is None


def test_a_capture_that_fails_leaves_prompts_eager_with_a_warning(monkeypatch, caplog):
    class OnCuda:
        device = torch.device("cuda")
        accelerator = None

    def fails(encoder):
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(text_graph, "GraphedTextEncoders", fails)
    encoder = OnCuda()
    with caplog.at_level(logging.WARNING, logger="bridge.accel.text_graph"):
        assert graph_text_encoders(encoder) is False
    assert encoder.accelerator is None
    assert caplog.messages == [
        "prompts are encoded eagerly: capturing the text encoders failed "
        "(operation not permitted when stream is capturing)."
    ]


# ------------------------------------------------------------------------------ on the GPU


@pytest.mark.gpu
def test_graphed_embeddings_equal_the_eager_ones_and_follow_the_prompt(cuda_stream):
    encoder = cuda_stream.prompts
    graphed = GraphedTextEncoders(encoder)
    expected = [eager(encoder, prompt) for prompt in PROMPTS]
    got = [graphed(encoder.token_ids(prompt)) for prompt in PROMPTS]
    assert graphed.replays == len(PROMPTS)
    for actual, wanted in zip(got, expected, strict=True):
        assert actual.shape == wanted.shape
        torch.testing.assert_close(actual, wanted, atol=TOLERANCE, rtol=TOLERANCE)
    # Each replay reads its own ids and hands out its own tensor: a stale replay would give the
    # first prompt's embedding again, a shared output would change the earlier results.
    for index in range(1, len(PROMPTS)):
        assert (got[index] - got[0]).abs().max().item() > 100 * TOLERANCE
    torch.testing.assert_close(got[0], eager(encoder, PROMPTS[0]), atol=TOLERANCE, rtol=TOLERANCE)


@pytest.mark.gpu
def test_accelerate_graphs_the_prompts_the_pipeline_encodes(cuda_stream):
    accelerate(cuda_stream, "cudagraph")
    graphed = cuda_stream.prompts.accelerator
    assert isinstance(graphed, GraphedTextEncoders)
    embedding = cuda_stream.encode_prompt("a lighthouse in a storm")
    assert graphed.replays == 1
    expected = eager(cuda_stream.prompts, "a lighthouse in a storm")
    torch.testing.assert_close(embedding, expected, atol=TOLERANCE, rtol=TOLERANCE)


@pytest.mark.gpu
def test_the_prompt_worker_gets_graphed_embeddings_on_its_own_stream(cuda_stream):
    encoder = cuda_stream.prompts
    encoder.accelerator = GraphedTextEncoders(encoder)
    worker = PromptWorker(cuda_stream.encode_prompt, cuda_stream.device)
    worker.start()
    try:
        for prompt, negative in [("city lights", "fog"), ("a quiet lake", "noise")]:
            worker.request(prompt, negative, 0.0)
            deadline = time.monotonic() + 60
            result = worker.take()
            while result is None and time.monotonic() < deadline:
                time.sleep(0.01)
                result = worker.take()
            assert result is not None and result.prompt == prompt
            result.wait()
            for got, text in [(result.cond, prompt), (result.uncond, negative)]:
                torch.testing.assert_close(
                    got, eager(encoder, text), atol=TOLERANCE, rtol=TOLERANCE
                )
    finally:
        worker.stop()
        worker.join(5)
    assert encoder.accelerator.replays == 4


@pytest.mark.gpu
def test_replays_from_two_threads_on_two_streams_each_get_their_own_prompt(cuda_stream):
    encoder = cuda_stream.prompts
    graphed = GraphedTextEncoders(encoder)
    prompts = ["a red fox in the snow", "a blue whale under the ice"]
    # Tokenized here: a fast tokenizer refuses to be used from two threads at once.
    ids = {prompt: encoder.token_ids(prompt) for prompt in prompts}
    # The same graph replayed from one thread is the reference: replays from two threads must
    # give it bit for bit (the graph against eager kernels is the other tests' business).
    expected = {prompt: graphed(ids[prompt]) for prompt in prompts}
    torch.cuda.synchronize()
    assert (expected[prompts[0]] - expected[prompts[1]]).abs().max() > 100 * TOLERANCE
    results: dict[str, list[torch.Tensor]] = {prompt: [] for prompt in prompts}

    def encode_many(prompt: str) -> None:
        with torch.cuda.stream(torch.cuda.Stream()):
            for _ in range(20):
                results[prompt].append(graphed(ids[prompt]))
            torch.cuda.current_stream().synchronize()

    threads = [threading.Thread(target=encode_many, args=(prompt,)) for prompt in prompts]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert graphed.replays == 42
    for prompt in prompts:
        for got in results[prompt]:
            assert torch.equal(got, expected[prompt])
