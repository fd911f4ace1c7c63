"""IP-Adapter in the pipeline: diffusers' arithmetic, a scale of 0 that is no adapter, pictures
that show, and negative-prompt passes that see no picture."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bridge.models import load_components
from bridge.models.ip_adapter import load_ip_adapter, read_ip_adapter_file
from bridge.stream import StreamConfig, StreamDiffusion
from bridge.stream.ip_adapter import install
from tests.stream.helpers import SIZE, frame

PROMPT = "a red fox in the snow"


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("ip-adapter")


def tiny(cache):
    return load_components("synthetic:tiny", vae="tiny", cache_dir=cache)


@pytest.fixture(scope="module")
def adapted(cache):
    """synthetic:tiny with its synthetic IP-Adapter installed: (components, adapter, prompt).

    Tests set the scale and picture they need; one that changes the tokens of no picture puts
    them back.
    """
    components = tiny(cache)
    adapter = load_ip_adapter(components, "synthetic:tiny", cache_dir=cache)
    return components, adapter, install(components.unet, adapter.empty_tokens())


def picture(seed: int) -> np.ndarray:
    """Two flat colours side by side: pictures that differ at the encoder's 8-pixel patches."""
    colours = np.random.default_rng(seed).integers(0, 256, (2, 3), dtype=np.uint8)
    pixels = np.empty((48, 48, 3), dtype=np.uint8)
    pixels[:, :24], pixels[:, 24:] = colours
    return pixels


def stream_on(components, **settings) -> StreamDiffusion:
    config = StreamConfig(width=SIZE, height=SIZE, **settings)
    return StreamDiffusion(components, config, prompt=PROMPT, negative_prompt="blurry")


def latents_of(stream: StreamDiffusion, frames: int = 3) -> torch.Tensor:
    """The final latents of a few frames in a row, before 8-bit rounding hides differences."""
    captured = []
    decode = stream.decode
    stream.decode = lambda x: captured.append(x.clone()) or decode(x)
    for index in range(frames):
        stream.img2img(frame(index))
    stream.decode = decode
    return torch.cat(captured)


@pytest.mark.parametrize("name", ["tiny", "tiny-xl"])
def test_our_layers_compute_what_diffusers_ip_adapter_processors_compute(cache, name):
    model = f"synthetic:{name}"
    ours, theirs = (load_components(model, vae="tiny", cache_dir=cache) for _ in range(2))
    adapter = load_ip_adapter(ours, model, cache_dir=cache)
    prompt = install(ours.unet, adapter.empty_tokens(), 0.7)
    theirs.unet._load_ip_adapter_weights([read_ip_adapter_file(adapter.path)])
    for processor in theirs.unet.attn_processors.values():
        if hasattr(processor, "scale"):
            processor.scale = [0.7]
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn((3, 4, 8, 8), generator=generator)
    context = torch.randn((3, 77, ours.unet.config.cross_attention_dim), generator=generator)
    added = {}
    if name == "tiny-xl":  # SDXL's pooled text and size ids
        added = {"text_embeds": torch.randn((3, 24), generator=generator)}
        added["time_ids"] = torch.tensor([[64.0, 64.0, 0.0, 0.0, 64.0, 64.0]]).expand(3, -1)
    embedding = adapter.image_encoder(adapter.pixel_values(picture(1))).image_embeds
    # Row 0 a negative-prompt pass: diffusers gives it a zero image embedding.
    embeds = torch.cat([torch.zeros_like(embedding), embedding, embedding])[:, None]
    prompt.set_image_tokens(adapter.image_projection(embedding))
    prompt.select(2)
    with torch.inference_mode():
        expected = theirs.unet(
            latents, 500, context, added_cond_kwargs={**added, "image_embeds": [embeds]}
        ).sample
        got = ours.unet(latents, 500, context, added_cond_kwargs=added).sample
        prompt.set_scale(0.0)
        without = ours.unet(latents, 500, context, added_cond_kwargs=added).sample
    assert (without - expected).abs().max().item() > 1e-3  # the picture shows at 0.7
    assert (got - expected).abs().max().item() < 1e-5


def test_a_scale_of_zero_is_the_model_without_an_adapter(cache, adapted):
    components, adapter, prompt = adapted
    prompt.set_scale(0.0)
    prompt.set_image_tokens(adapter.image_tokens(picture(1)))
    with torch.inference_mode():
        plain = latents_of(stream_on(tiny(cache)))
        adapted = latents_of(stream_on(components))
        prompt.set_scale(1.0)
        shown = latents_of(stream_on(components))
    assert (adapted - plain).abs().max().item() < 1e-6
    assert (shown - plain).abs().max().item() > 1e-2


def test_two_pictures_give_two_different_outputs(adapted):
    components, adapter, prompt = adapted
    prompt.set_scale(1.0)
    outputs = []
    with torch.inference_mode():
        for seed in (1, 2):
            prompt.set_image_tokens(adapter.image_tokens(picture(seed)))
            outputs.append(latents_of(stream_on(components, t_index_list=(20,))))
    assert (outputs[0] - outputs[1]).abs().mean().item() > 1e-2


@pytest.mark.parametrize(("cfg_type", "sees_no_picture"), [("full", True), ("none", False)])
def test_only_negative_prompt_passes_see_the_tokens_of_no_picture(
    adapted, cfg_type, sees_no_picture
):
    components, adapter, prompt = adapted
    prompt.set_scale(1.0)
    prompt.set_image_tokens(adapter.image_tokens(picture(1)))
    settings = {"cfg_type": cfg_type, "guidance_scale": 2.0, "t_index_list": (20,)}
    with torch.inference_mode():
        before = latents_of(stream_on(components, **settings), frames=1)
        prompt.tokens[0].copy_(adapter.image_tokens(picture(2))[0])
        after = latents_of(stream_on(components, **settings), frames=1)
        prompt.tokens[0].copy_(adapter.empty_tokens()[0])
    moved = (after - before).abs().max().item()
    assert (moved > 1e-3) is sees_no_picture, moved


def test_the_preprocessing_is_clips(adapted):
    from transformers import CLIPImageProcessor

    _, adapter, _ = adapted
    pixels = np.random.default_rng(0).integers(0, 256, (60, 90, 3), dtype=np.uint8)
    size = adapter.image_encoder.config.image_size
    reference = CLIPImageProcessor(size=size, crop_size=size)(images=pixels, return_tensors="pt")
    ours = adapter.pixel_values(pixels)
    assert ours.shape == reference.pixel_values.shape == (1, 3, size, size)
    assert (ours - reference.pixel_values).abs().mean().item() < 0.03
