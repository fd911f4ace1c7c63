"""Under a CUDA graph: a ControlNet and an IP-Adapter in one pipeline replay as they run eagerly,
and live changes to either (scales, control image, picture) reach the replayed frames with no new
capture."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bridge.accel import accelerate
from bridge.models.controlnet import load_controlnet
from bridge.models.ip_adapter import load_ip_adapter
from bridge.stream import ControlNet, StreamConfig, StreamDiffusion
from bridge.stream.ip_adapter import install
from tests.accel.helpers import SIZE, Tapped, apart, frames, load_tiny, same

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("synthetic")


def picture(seed: int, side: int) -> np.ndarray:
    """A coloured square on black at a place of the seed's: a picture with edges."""
    rng = np.random.default_rng(seed)
    pixels = np.zeros((side, side, 3), np.uint8)
    top, left = rng.integers(0, side // 2, 2)
    pixels[top : top + side // 2, left : left + side // 2] = rng.integers(64, 256, 3)
    return pixels


def build(cache, accel: str, **settings):
    """A tapped pipeline on its own adapted tiny model, with a canny ControlNet on the input and
    one on a picture from outside: (pipeline, adapter, image prompt)."""
    components = load_tiny("cuda", cache)
    adapter = load_ip_adapter(components, "synthetic:tiny", cache_dir=cache)
    image_prompt = install(components.unet, adapter.empty_tokens(), 0.6)
    image_prompt.set_image_tokens(adapter.image_tokens(picture(1, 48)))
    model = load_controlnet(
        "synthetic:controlnet-tiny",
        components.unet.config,
        device="cuda",
        dtype=torch.float32,
        cache_dir=cache,
    )
    controlnets = [ControlNet(model, "canny", scale=0.8), ControlNet(model, "image", scale=0.6)]
    config = StreamConfig(width=SIZE, height=SIZE, **settings)
    stream = StreamDiffusion(
        components, config, prompt="a forest", negative_prompt="fog", controlnets=controlnets
    )
    stream.controlnets.set_image(1, picture(2, SIZE))
    return Tapped(accelerate(stream, accel)), adapter, image_prompt


@pytest.mark.parametrize("cfg_type", ["none", "full", "self"])
def test_replays_equal_the_eager_steps_with_both(cache, cfg_type):
    settings = {"t_index_list": (20, 35), "cfg_type": cfg_type}
    graphed, _, _ = build(cache, "cudagraph", **settings)
    eager, _, _ = build(cache, "none", **settings)
    with torch.inference_mode():
        for pixels in frames(5):
            assert same(graphed(pixels), eager(pixels))
    assert graphed.accelerator.captures == 1


def test_live_changes_to_either_reach_the_replay_without_a_new_capture(cache):
    settings = {"t_index_list": (20,), "cfg_type": "none"}  # a frame depends on its input alone
    graphed, adapter, graphed_prompt = build(cache, "cudagraph", **settings)
    eager, _, eager_prompt = build(cache, "none", **settings)
    tokens = adapter.image_tokens(picture(3, 48))
    changes = [
        lambda stream, prompt: prompt.set_scale(1.5),
        lambda stream, prompt: stream.controlnets.set_scale(0, 1.6),
        lambda stream, prompt: prompt.set_image_tokens(tokens),
        lambda stream, prompt: stream.controlnets.set_image(1, picture(4, SIZE)),
    ]
    pixels = frames(1)[0]
    with torch.inference_mode():
        graphed(pixels)  # the first replay follows the capture
        before = graphed(pixels)
        assert same(before, eager(pixels))
        for change in changes:
            change(graphed, graphed_prompt)
            change(eager, eager_prompt)
            after = graphed(pixels)
            assert same(after, eager(pixels))
            assert apart(after, before, pixel_gap=0.5), "the change must reach the replay"
            before = after
    assert graphed.accelerator.captures == 1
