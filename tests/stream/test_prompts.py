"""Prompt embeddings: encoded once per prompt, swapped in on the next frame, layout kept."""

from __future__ import annotations

import pytest
import torch

from tests.stream.helpers import UNetSpy, latents


@pytest.mark.parametrize("cfg_type", ["none", "full", "self", "initialize"])
def test_a_prompt_change_takes_effect_on_the_next_frame(make_stream, cfg_type):
    steady = make_stream(cfg_type=cfg_type, guidance_scale=1.5)
    changed = make_stream(cfg_type=cfg_type, guidance_scale=1.5)
    for _ in range(3):
        torch.testing.assert_close(steady.denoise(latents(1)), changed.denoise(latents(1)))
    changed.set_prompt("a blue whale under the ice")
    assert not torch.allclose(steady.denoise(latents(1)), changed.denoise(latents(1)), atol=1e-5)


@pytest.mark.parametrize("cfg_type", ["full", "initialize"])
def test_a_prompt_change_keeps_the_negative_and_positive_halves_in_place(make_stream, cfg_type):
    stream = make_stream(cfg_type=cfg_type, t_index_list=(20, 32, 45))
    stream.denoise(latents(1))
    stream.set_prompt("a city at night", negative_prompt="washed out")
    cond = stream.encode_prompt("a city at night")[0]
    uncond = stream.encode_prompt("washed out")[0]
    spy = UNetSpy(stream.unet)
    try:
        stream.denoise(latents(1))
    finally:
        spy.close()
    (context,) = spy.contexts
    negatives = 3 if cfg_type == "full" else 1
    assert context.shape[0] == negatives + 3
    for row in context[:negatives]:
        torch.testing.assert_close(row, uncond)
    for row in context[negatives:]:
        torch.testing.assert_close(row, cond)


def test_the_text_encoder_runs_once_per_distinct_prompt(make_stream):
    stream = make_stream(prompt="first", negative_prompt="")
    calls = []
    handle = stream.prompts.text_encoder.register_forward_hook(lambda *a: calls.append(1))
    try:
        for prompt in ["second", "first", "second", "third", "first"]:
            stream.set_prompt(prompt)
            stream.denoise(latents(1))
    finally:
        handle.remove()
    assert len(calls) == 2  # "second" and "third"; "first" was encoded at construction
    assert stream.prompts.encode_count == 4  # with "" and "first" from construction


def test_the_cache_forgets_the_least_recently_used_prompt(tiny):
    from bridge.stream import PromptEncoder

    encoder = PromptEncoder(tiny.tokenizer, tiny.text_encoder, cache_size=2)
    encoder("a")
    encoder("b")
    encoder("a")
    encoder("c")  # evicts "b"
    assert encoder.encode_count == 3
    encoder("a")
    assert encoder.encode_count == 3
    encoder("b")
    assert encoder.encode_count == 4


def test_embeddings_can_be_blended_for_a_cross_fade(make_stream):
    stream = make_stream(cfg_type="none")
    a, b = stream.encode_prompt("sunrise"), stream.encode_prompt("thunderstorm")
    stream.set_embeddings(a)
    out_a = stream.denoise(latents(1))
    stream.set_embeddings(0.5 * a + 0.5 * b)
    out_mid = stream.denoise(latents(1))
    stream.set_embeddings(b)
    out_b = stream.denoise(latents(1))
    assert not torch.allclose(out_mid, out_a) and not torch.allclose(out_mid, out_b)
    with pytest.raises(ValueError, match="does not fit this text encoder"):
        stream.set_embeddings(a[:, :10])


def test_different_prompts_give_different_embeddings(make_stream):
    stream = make_stream()
    assert not torch.allclose(stream.encode_prompt("a cat"), stream.encode_prompt("a dog"))
