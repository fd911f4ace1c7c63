"""ControlNet under a CUDA graph: replays equal the eager steps; a scale, a canny threshold or a new
control image reaches the replayed output without a new capture; switching one on or off captures
again."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bridge.accel import accelerate
from bridge.models.controlnet import load_controlnet
from bridge.stream import ControlNet, StreamConfig, StreamDiffusion
from tests.accel.helpers import SIZE, Tapped, apart, frames, load_tiny, same

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("synthetic")


@pytest.fixture(scope="module")
def components(cache):
    return load_tiny("cuda", cache)


@pytest.fixture(scope="module")
def model(components, cache):
    return load_controlnet(
        "synthetic:controlnet-tiny",
        components.unet.config,
        device="cuda",
        dtype=torch.float32,
        cache_dir=cache,
    )


def build(components, model, accel: str, **settings) -> Tapped:
    """A pipeline with a canny ControlNet on the input and one on a picture from outside."""
    config = StreamConfig(width=SIZE, height=SIZE, **settings)
    controlnets = [ControlNet(model, "canny", scale=0.8), ControlNet(model, "image", scale=0.6)]
    stream = StreamDiffusion(
        components, config, prompt="a forest", negative_prompt="fog", controlnets=controlnets
    )
    return Tapped(accelerate(stream, accel))


def control_picture(seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    picture = np.zeros((SIZE, SIZE, 3), np.uint8)
    top, left = rng.integers(0, SIZE // 2, 2)
    picture[top : top + SIZE // 2, left : left + SIZE // 2] = rng.integers(64, 256, 3)
    return picture


@pytest.mark.parametrize("cfg_type", ["self", "full", "initialize"])
def test_replays_equal_the_eager_steps_in_stream_batch(components, model, cfg_type):
    settings = {"t_index_list": (32, 45), "cfg_type": cfg_type, "frame_buffer_size": 2}
    graphed = build(components, model, "cudagraph", **settings)
    eager = build(components, model, "none", **settings)
    for stream in (graphed, eager):
        stream.controlnets.set_image(1, control_picture(1))
    pictures = frames(8)
    with torch.inference_mode():
        outputs = [
            (graphed(torch.stack(pair)), eager(torch.stack(pair)))
            for pair in zip(pictures[::2], pictures[1::2], strict=True)
        ]
    for replayed, expected in outputs:
        assert same(replayed, expected)
    assert graphed.accelerator.captures == 1


def test_live_values_and_a_new_control_image_reach_the_replay_without_a_new_capture(
    components, model
):
    settings = {"t_index_list": (32,), "cfg_type": "none"}  # a frame depends on its input alone
    graphed = build(components, model, "cudagraph", **settings)
    eager = build(components, model, "none", **settings)
    picture = frames(1)[0]
    changes = [
        lambda controls: controls.set_scale(0, 1.6),
        lambda controls: controls.set_canny(0, 5.0, 10.0),  # faint borders count too
        lambda controls: controls.set_image(1, control_picture(2)),
        lambda controls: controls.set_scale(1, 0.0),
    ]
    with torch.inference_mode():
        for stream in (graphed, eager):
            stream.controlnets.set_image(1, control_picture(1))
            stream(picture)  # the first replay follows the capture
        before = graphed(picture)
        assert same(before, eager(picture))
        for change in changes:
            for stream in (graphed, eager):
                change(stream.controlnets)
            after = graphed(picture)
            assert same(after, eager(picture))
            assert apart(after, before, pixel_gap=0.5), "the change must reach the replay"
            before = after
    assert graphed.accelerator.captures == 1


def test_switching_a_controlnet_off_or_on_captures_again_and_follows_the_switch(components, model):
    settings = {"t_index_list": (32,), "cfg_type": "none"}
    graphed = build(components, model, "cudagraph", **settings)
    config = StreamConfig(width=SIZE, height=SIZE, **settings)
    plain = StreamDiffusion(components, config, prompt="a forest", negative_prompt="fog")
    plain = Tapped(accelerate(plain, "cudagraph"))
    picture = frames(1)[0]
    with torch.inference_mode():
        graphed.controlnets.set_image(1, control_picture(1))
        graphed(picture)
        steered = graphed(picture)
        assert graphed.accelerator.captures == 1
        graphed.controlnets.set_enabled(0, False)
        graphed.controlnets.set_enabled(1, False)
        graphed(picture)
        switched_off = graphed(picture)
        plain(picture)
        without = plain(picture)
        assert graphed.accelerator.captures == 2
        graphed.controlnets.set_enabled(0, True)
        graphed.controlnets.set_enabled(1, True)
        graphed(picture)
        back_on = graphed(picture)
    assert same(switched_off, without)
    assert apart(steered, without)
    assert same(back_on, steered)
    assert graphed.accelerator.captures == 3
