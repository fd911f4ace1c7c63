"""SDXL through the same StreamDiffusion: two text encoders, the pooled embedding and size ids.

Runs on synthetic:tiny-xl, SDXL's architecture at the size of synthetic:tiny (both text
encoders, ``text_time`` added conditioning), loaded through the real loader.
"""

from __future__ import annotations

import dataclasses
import types

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionXLPipeline

from bridge.models import load_components
from bridge.runtime.prompts import PromptWorker
from bridge.stream import StreamConfig, StreamDiffusion
from tests.control.helpers import wait_until
from tests.stream.helpers import SIZE, latents

STEP_LISTS = {1: (45,), 2: (32, 45), 4: (0, 16, 32, 45)}
CFG_TYPES = ("none", "full", "self", "initialize")


@pytest.fixture(scope="module")
def tiny_xl(tmp_path_factory):
    """synthetic:tiny-xl with its TAESDXL-shaped tiny VAE, on the CPU in float32."""
    return load_components(
        "synthetic:tiny-xl", vae="tiny", cache_dir=tmp_path_factory.mktemp("synthetic")
    )


@pytest.fixture
def make_xl(tiny_xl):
    def make(**settings) -> StreamDiffusion:
        prompt = settings.pop("prompt", "a red fox in the snow")
        negative = settings.pop("negative_prompt", "blurry")
        settings.setdefault("width", SIZE)
        settings.setdefault("height", SIZE)
        config = StreamConfig(**settings)
        return StreamDiffusion(tiny_xl, config, prompt=prompt, negative_prompt=negative)

    return make


class AddedSpy:
    """Records the added conditioning of every UNet call."""

    def __init__(self, unet) -> None:
        self.calls: list[dict[str, torch.Tensor]] = []
        self.handle = unet.register_forward_pre_hook(self._record, with_kwargs=True)

    def _record(self, module, args, kwargs):
        added = kwargs["added_cond_kwargs"]
        self.calls.append({name: value.clone() for name, value in added.items()})
        self.calls[-1]["context"] = kwargs["encoder_hidden_states"].clone()

    def close(self) -> None:
        self.handle.remove()


@pytest.fixture
def spy(tiny_xl):
    recorder = AddedSpy(tiny_xl.unet)
    yield recorder
    recorder.close()


def _pooled(components, prompt: str) -> torch.Tensor:
    """What SDXL's second text encoder gives as the pooled embedding of `prompt`."""
    ids = components.tokenizer_2(
        prompt, padding="max_length", max_length=77, truncation=True, return_tensors="pt"
    ).input_ids
    with torch.no_grad():
        return components.text_encoder_2(ids).text_embeds


def _tokens(components, prompt: str) -> torch.Tensor:
    """Both encoders' penultimate layers side by side, as SDXL reads them."""
    hidden = []
    for tokenizer, encoder in (
        (components.tokenizer, components.text_encoder),
        (components.tokenizer_2, components.text_encoder_2),
    ):
        ids = tokenizer(
            prompt, padding="max_length", max_length=77, truncation=True, return_tensors="pt"
        ).input_ids
        with torch.no_grad():
            hidden.append(encoder(ids, output_hidden_states=True).hidden_states[-2])
    return torch.cat(hidden, dim=-1)


def _tokens_and_pooled(components, prompt: str) -> torch.Tensor:
    """The packed (1, 77 + 1, width) tensor the pipeline keeps for `prompt`: tokens, then a row
    holding the pooled embedding, zeros after it."""
    tokens, pooled = _tokens(components, prompt), _pooled(components, prompt)
    row = torch.zeros((1, 1, tokens.shape[-1]))
    row[0, 0, : pooled.shape[-1]] = pooled
    return torch.cat([tokens, row], dim=1)


def _picture(seed: int) -> np.ndarray:
    """Two colours side by side: structure at the scale of the latent grid (uniform noise would
    average to grey in every 8x8 block)."""
    colours = np.random.default_rng(seed).integers(0, 256, (2, 3), dtype=np.uint8)
    picture = np.empty((SIZE, SIZE, 3), dtype=np.uint8)
    picture[:, : SIZE // 2], picture[:, SIZE // 2 :] = colours
    return picture


@pytest.mark.parametrize("cfg_type", CFG_TYPES)
def test_img2img_follows_its_input_for_every_cfg_type(make_xl, cfg_type):
    # One step: each output is its own input's, with no frames in flight.
    stream = make_xl(t_index_list=STEP_LISTS[1], cfg_type=cfg_type)
    out_a, out_b = stream(_picture(1)), stream(_picture(2))
    assert out_a.shape == (SIZE, SIZE, 3) and out_a.dtype == np.uint8
    assert np.abs(out_a.astype(int) - out_b.astype(int)).mean() > 2.0
    np.testing.assert_array_equal(stream(_picture(1)), out_a)


@pytest.mark.parametrize("cfg_type", CFG_TYPES)
def test_txt2img_follows_the_prompt_for_every_cfg_type(make_xl, cfg_type):
    stream = make_xl(mode="txt2img", t_index_list=STEP_LISTS[2], cfg_type=cfg_type)
    first = stream.txt2img()
    assert first.shape == (1, SIZE, SIZE, 3) and first.dtype == torch.uint8
    before = stream.denoise(torch.zeros_like(latents(0)))
    stream.set_prompt("an entirely different prompt")
    after = stream.denoise(torch.zeros_like(latents(0)))
    assert (before - after).abs().mean() > 1e-3


@pytest.mark.parametrize("k", [2, 4])
@pytest.mark.parametrize("cfg_type", CFG_TYPES)
def test_stream_batch_matches_sequential_steps_for_sdxl(make_xl, k, cfg_type):
    batched = make_xl(t_index_list=STEP_LISTS[k], cfg_type=cfg_type)
    sequential = make_xl(t_index_list=STEP_LISTS[k], cfg_type=cfg_type, use_denoising_batch=False)
    x0 = latents(1)
    expected = sequential.denoise(x0)
    for _ in range(k + 1):
        torch.testing.assert_close(batched.denoise(x0), expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("cfg_type", CFG_TYPES)
def test_every_latent_of_every_unet_call_gets_the_size_ids(make_xl, spy, cfg_type):
    # The added conditioning does not reach tiny-xl's picture, so it is checked where it enters.
    stream = make_xl(t_index_list=STEP_LISTS[4], cfg_type=cfg_type)
    for _ in range(2):
        stream.denoise(latents(1))
    size_ids = torch.tensor([float(SIZE), SIZE, 0, 0, SIZE, SIZE])
    assert spy.calls
    for call in spy.calls:
        count = call["context"].shape[0]
        assert call["text_embeds"].shape[0] == count
        torch.testing.assert_close(call["time_ids"], size_ids.expand(count, -1), rtol=0, atol=0)


def test_the_unet_gets_both_encoders_tokens_and_the_pooled_embedding(make_xl, tiny_xl, spy):
    stream = make_xl(t_index_list=STEP_LISTS[1], cfg_type="none", prompt="a forest")
    stream.denoise(latents(1))
    call = spy.calls[-1]
    torch.testing.assert_close(call["context"], _tokens(tiny_xl, "a forest"))
    torch.testing.assert_close(call["text_embeds"], _pooled(tiny_xl, "a forest"))
    stream.set_prompt("a desert at noon")
    stream.denoise(latents(1))
    torch.testing.assert_close(spy.calls[-1]["text_embeds"], _pooled(tiny_xl, "a desert at noon"))
    assert not torch.allclose(spy.calls[-1]["text_embeds"], call["text_embeds"])


def test_full_guidance_pairs_each_latent_with_its_prompts_pooled_embedding(make_xl, tiny_xl, spy):
    stream = make_xl(t_index_list=STEP_LISTS[2], cfg_type="full", negative_prompt="fog")
    stream.denoise(latents(1))
    pooled = spy.calls[-1]["text_embeds"]
    negative, positive = pooled.chunk(2)
    torch.testing.assert_close(negative, _pooled(tiny_xl, "fog").expand(2, -1))
    torch.testing.assert_close(positive, _pooled(tiny_xl, "a red fox in the snow").expand(2, -1))


def test_size_ids_follow_the_stream_size_and_change_with_it(make_xl, spy):
    stream = make_xl(t_index_list=STEP_LISTS[1], cfg_type="none", width=96, height=64)
    stream(np.zeros((64, 96, 3), dtype=np.uint8))
    # Original size, crop corner, target size; (height, width) as SDXL was trained.
    expected = torch.tensor([[64.0, 96.0, 0.0, 0.0, 64.0, 96.0]])
    torch.testing.assert_close(spy.calls[-1]["time_ids"], expected)
    stream.update(width=128, height=72)
    stream(np.zeros((72, 128, 3), dtype=np.uint8))
    torch.testing.assert_close(
        spy.calls[-1]["time_ids"], torch.tensor([[72.0, 128.0, 0.0, 0.0, 72.0, 128.0]])
    )


def test_a_cross_fade_of_two_prompts_blends_their_pooled_embeddings(make_xl, tiny_xl, spy):
    stream = make_xl(t_index_list=STEP_LISTS[1], cfg_type="none")
    a, b = stream.encode_prompt("a forest"), stream.encode_prompt("a desert at noon")
    stream.set_embeddings(torch.lerp(a, b, 0.25))
    stream.denoise(latents(1))
    expected = torch.lerp(_pooled(tiny_xl, "a forest"), _pooled(tiny_xl, "a desert at noon"), 0.25)
    torch.testing.assert_close(spy.calls[-1]["text_embeds"], expected)


def test_a_new_seed_and_new_steps_apply_live(make_xl):
    stream = make_xl(t_index_list=(32, 45), cfg_type="self")
    stream.denoise(latents(1))
    stream.update(t_index_list=(10, 20, 30), seed=9)
    reference = make_xl(t_index_list=(10, 20, 30), cfg_type="self", seed=9)
    reference.update(use_denoising_batch=False)
    torch.testing.assert_close(
        stream.denoise(latents(1)), reference.denoise(latents(1)), rtol=1e-4, atol=1e-4
    )
    assert stream.last_unet_batch == 3


def test_the_similarity_filter_skips_a_repeated_frame(make_xl):
    stream = make_xl(
        t_index_list=STEP_LISTS[1],
        cfg_type="none",
        similarity_filter=True,
        similarity_threshold=0.5,
        max_skip_frames=5,
    )
    first = stream(_picture(3))
    again = stream(_picture(3))
    assert stream.frames_skipped == 1
    np.testing.assert_array_equal(again, first)


def test_a_size_the_unet_cannot_halve_is_refused_in_one_sentence(make_xl):
    with pytest.raises(ValueError, match=r"8x64 is too small for this model") as error:
        make_xl(width=8)
    assert str(error.value).count(". ") == 0
    stream = make_xl()
    with pytest.raises(ValueError, match="too small"):
        stream.update(height=8)
    assert stream.config.height == SIZE


def test_an_sdxl_unet_without_a_second_text_encoder_is_refused(tiny_xl):
    halved = types.SimpleNamespace(**{**vars(tiny_xl), "text_encoder_2": None})
    with pytest.raises(ValueError, match="second tokenizer and text encoder"):
        StreamDiffusion(halved, StreamConfig(width=SIZE, height=SIZE))


def _with_zeros_flag(components, force_zeros: bool):
    """The same networks with the pipeline's force_zeros_for_empty_prompt set to `force_zeros`."""
    return dataclasses.replace(components, force_zeros_for_empty_prompt=force_zeros)


def _diffusers_conditioning(components, prompt: str) -> tuple[torch.Tensor, ...]:
    """diffusers' own SDXL encoding of `prompt` with no negative prompt, over the same networks:
    (tokens, negative tokens, pooled, negative pooled)."""
    pipeline = StableDiffusionXLPipeline(
        **components.pipeline_networks(),
        scheduler=components.scheduler,
        force_zeros_for_empty_prompt=components.force_zeros_for_empty_prompt,
        add_watermarker=False,
    )
    with torch.no_grad():
        return pipeline.encode_prompt(prompt, device="cpu", do_classifier_free_guidance=True)


@pytest.mark.parametrize("prompt", ["a red fox in the snow", ""])
@pytest.mark.parametrize("force_zeros", [True, False])
def test_an_empty_negative_prompt_conditions_the_unet_as_diffusers_does(
    tiny_xl, spy, force_zeros, prompt
):
    components = _with_zeros_flag(tiny_xl, force_zeros)
    config = StreamConfig(width=SIZE, height=SIZE, t_index_list=STEP_LISTS[1], cfg_type="full")
    stream = StreamDiffusion(components, config, prompt=prompt, negative_prompt="")
    stream.denoise(latents(1))
    negative, positive = spy.calls[-1]["context"].chunk(2)
    negative_pooled, pooled = spy.calls[-1]["text_embeds"].chunk(2)
    expected = _diffusers_conditioning(components, prompt)
    torch.testing.assert_close(positive, expected[0])
    torch.testing.assert_close(negative, expected[1])
    torch.testing.assert_close(pooled, expected[2])
    torch.testing.assert_close(negative_pooled, expected[3])
    # With the flag the negative side is zeros, tokens and pooled; without it, the encoding of
    # "". The prompt is encoded as it is either way, "" included.
    assert (negative.count_nonzero() == 0) == force_zeros
    assert (negative_pooled.count_nonzero() == 0) == force_zeros
    if not force_zeros:
        torch.testing.assert_close(negative, _tokens(tiny_xl, ""))
        torch.testing.assert_close(negative_pooled, _pooled(tiny_xl, ""))
    torch.testing.assert_close(positive, _tokens(tiny_xl, prompt))
    torch.testing.assert_close(pooled, _pooled(tiny_xl, prompt))


def test_a_live_negative_prompt_change_to_empty_gives_zeros_and_back(tiny_xl, spy):
    config = StreamConfig(width=SIZE, height=SIZE, t_index_list=STEP_LISTS[1], cfg_type="full")
    stream = StreamDiffusion(tiny_xl, config, prompt="a forest", negative_prompt="fog")
    assert tiny_xl.force_zeros_for_empty_prompt
    stream.set_prompt("a forest", negative_prompt="")
    stream.denoise(latents(1))
    assert spy.calls[-1]["context"].chunk(2)[0].count_nonzero() == 0
    stream.set_prompt("a forest", negative_prompt="fog")
    stream.denoise(latents(1))
    torch.testing.assert_close(spy.calls[-1]["context"].chunk(2)[0], _tokens(tiny_xl, "fog"))


@pytest.mark.parametrize("force_zeros", [True, False])
def test_the_prompt_worker_encodes_the_empty_negative_prompt_as_the_pipeline_does(
    tiny_xl, force_zeros
):
    # The engine encodes live prompt changes on this worker, off the frame path.
    config = StreamConfig(width=SIZE, height=SIZE, t_index_list=STEP_LISTS[1], cfg_type="full")
    stream = StreamDiffusion(_with_zeros_flag(tiny_xl, force_zeros), config, negative_prompt="x")
    worker = PromptWorker(stream.encode_prompt, stream.device)
    worker.start()
    try:
        worker.request("", "", 0.0)
        encoded = []
        assert wait_until(
            lambda: encoded.append(worker.take()) or encoded[-1] is not None, timeout=30
        )
    finally:
        worker.stop()
    uncond, cond = encoded[-1].uncond, encoded[-1].cond
    torch.testing.assert_close(cond, _tokens_and_pooled(tiny_xl, ""))
    if force_zeros:
        assert uncond.count_nonzero() == 0
    else:
        torch.testing.assert_close(uncond, cond)
