"""ControlNet in the stream: it steers the picture by its control image, per frame, live."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bridge.models import load_components
from bridge.models.controlnet import load_controlnet
from bridge.stream import ControlNet, StreamConfig, StreamDiffusion

# The tiny UNet halves its latent once, so 32x32 frames (4x4 latents) are enough, and cheap.
SIZE = 32
ONE_STEP = {"t_index_list": (32,), "cfg_type": "none"}
STEPS = {2: (32, 45), 3: (20, 32, 45)}
# What a ControlNet or another control image must change at least, on average, in the latents
# (measured: 0.3 to 0.7 on the tiny models, whose latents average about 1.3 in size).
LATENT_GAP = 0.05


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("controlnet")


@pytest.fixture(scope="module")
def controlnet(tiny, cache):
    """synthetic:controlnet-tiny, built and loaded through the real loader."""
    return load_controlnet("synthetic:controlnet-tiny", tiny.unet.config, cache_dir=cache)


@pytest.fixture(scope="module")
def tiny_xl(cache):
    """synthetic:tiny-xl, SDXL's shape: its ControlNets need the added conditioning too."""
    return load_components("synthetic:tiny-xl", vae="tiny", cache_dir=cache)


def pictures(count: int, seed: int = 0, frames: int = 1) -> list[np.ndarray]:
    """Frames with a coloured square at a place of its own each: their edges differ."""
    rng = np.random.default_rng(seed)
    made = []
    for _ in range(count):
        batch = np.zeros((frames, SIZE, SIZE, 3), np.uint8)
        for picture in batch:
            top, left = rng.integers(2, SIZE // 2, 2)
            picture[top : top + SIZE // 3, left : left + SIZE // 3] = rng.integers(80, 256, 3)
        made.append(batch[0] if frames == 1 else batch)
    return made


def stream_of(components, controlnets=(), **settings) -> StreamDiffusion:
    config = StreamConfig(width=SIZE, height=SIZE, **settings)
    return StreamDiffusion(
        components, config, prompt="a fox", negative_prompt="fog", controlnets=controlnets
    )


def latents(stream: StreamDiffusion, frames) -> list[torch.Tensor]:
    """The finished latents of each img2img call, before decoding."""
    captured: list[torch.Tensor] = []
    decode = stream.decode
    stream.decode = lambda x: captured.append(x.clone()) or decode(x)
    for frame in frames:
        stream.img2img(frame)
    stream.decode = decode
    return captured


def gap(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return min((x - y).abs().mean().item() for x, y in zip(a, b, strict=True))


def test_a_controlnet_changes_the_picture_and_at_scale_0_it_is_as_without(tiny, controlnet):
    frames = pictures(1)
    without = latents(stream_of(tiny, **ONE_STEP), frames)
    steered = latents(stream_of(tiny, [ControlNet(controlnet)], **ONE_STEP), frames)
    at_zero = latents(stream_of(tiny, [ControlNet(controlnet, scale=0.0)], **ONE_STEP), frames)
    assert gap(steered, without) > LATENT_GAP
    for zero, plain in zip(at_zero, without, strict=True):
        torch.testing.assert_close(zero, plain, rtol=0, atol=1e-6)


def test_the_control_image_steers_the_picture(tiny, controlnet):
    frames = pictures(1)
    edges = latents(stream_of(tiny, [ControlNet(controlnet, "canny")], **ONE_STEP), frames)
    itself = latents(stream_of(tiny, [ControlNet(controlnet, "passthrough")], **ONE_STEP), frames)
    assert gap(edges, itself) > LATENT_GAP


def test_two_controlnets_add_up_and_each_follows_its_own_scale(tiny, controlnet):
    frames = pictures(1)
    one = latents(stream_of(tiny, [ControlNet(controlnet, "canny")], **ONE_STEP), frames)
    pair = [ControlNet(controlnet, "canny"), ControlNet(controlnet, "passthrough", scale=0.0)]
    assert gap(latents(stream_of(tiny, pair, **ONE_STEP), frames), one) < 1e-6
    pair[1].scale = 0.7
    assert gap(latents(stream_of(tiny, pair, **ONE_STEP), frames), one) > LATENT_GAP


@pytest.mark.parametrize("cfg_type", ["none", "full", "self", "initialize"])
@pytest.mark.parametrize("frames", [1, 2])
@pytest.mark.parametrize("k", [2, 3])
def test_stream_batch_with_controlnets_equals_the_steps_one_after_the_other(
    tiny, controlnet, k, frames, cfg_type
):
    settings = {"t_index_list": STEPS[k], "cfg_type": cfg_type, "frame_buffer_size": frames}
    given = pictures(k + 1, seed=k * 10 + frames, frames=frames)
    # The first call fills the buffer with its frames; from call k on they are all different,
    # each at its own step, and output lags input by k - 1 calls. The second frame is the first
    # to enter a primed buffer: its negative pass ("initialize") runs beside other frames.
    batched = latents(stream_of(tiny, [ControlNet(controlnet)], **settings), given)
    sequential = stream_of(tiny, [ControlNet(controlnet)], use_denoising_batch=False, **settings)
    for entered in (0, 1):
        expected = latents(sequential, given[entered : entered + 1])[0]
        torch.testing.assert_close(batched[k - 1 + entered], expected, rtol=1e-4, atol=1e-4)
    # With the newest frame's control image at every step, the first frame would come out so.
    first, newest = latents(sequential, [given[0], given[-1]])
    assert (newest - first).abs().mean().item() > LATENT_GAP


def test_a_live_scale_gives_what_a_pipeline_started_at_it_gives(tiny, controlnet):
    frames = pictures(1) * 2
    stream = stream_of(tiny, [ControlNet(controlnet, scale=1.0)], **ONE_STEP)
    before = latents(stream, frames[:1])
    stream.controlnets.set_scale(0, 0.4)
    after = latents(stream, frames[1:])
    started = latents(stream_of(tiny, [ControlNet(controlnet, scale=0.4)], **ONE_STEP), frames[1:])
    assert gap(after, before) > LATENT_GAP
    torch.testing.assert_close(after[0], started[0], rtol=0, atol=1e-6)


def test_a_disabled_controlnet_leaves_the_picture_as_without_and_changes_the_graph_key(
    tiny, controlnet
):
    frames = pictures(2)
    without = latents(stream_of(tiny, **ONE_STEP), frames)
    stream = stream_of(tiny, [ControlNet(controlnet), ControlNet(controlnet, "passthrough")])
    stream.update(**ONE_STEP)
    pixels = torch.from_numpy(frames[0])[None]
    on_key = stream.graph_key(pixels, "rgb")
    stream.controlnets.set_enabled(0, False)
    stream.controlnets.set_enabled(1, False)
    assert stream.graph_key(pixels, "rgb") != on_key
    torch.testing.assert_close(latents(stream, frames)[1], without[1], rtol=0, atol=1e-6)
    stream.controlnets.set_enabled(1, True)
    assert gap(latents(stream, frames[1:]), without[1:]) > LATENT_GAP


def test_canny_thresholds_change_live_and_no_edges_is_a_black_control_image(tiny, controlnet):
    frames = pictures(2)
    stream = stream_of(tiny, [ControlNet(controlnet, "canny")], **ONE_STEP)
    edges = latents(stream, frames[:1])
    stream.controlnets.set_canny(0, 2000.0, 2040.0)  # above any gradient: no edge at all
    none = latents(stream, frames[:1])
    black = stream_of(tiny, [ControlNet(controlnet, "image")], **ONE_STEP)
    assert gap(edges, none) > LATENT_GAP
    torch.testing.assert_close(none[0], latents(black, frames[:1])[0], rtol=0, atol=1e-6)


def test_a_picture_from_outside_steers_the_picture_and_another_size_is_resized(tiny, controlnet):
    frame = pictures(1)[0]
    stream = stream_of(tiny, [ControlNet(controlnet, "image")], **ONE_STEP)
    black = latents(stream, [frame])
    stream.controlnets.set_image(0, np.full((SIZE, SIZE, 3), (200, 40, 90), np.uint8))
    steered = latents(stream, [frame])
    # The same colour at another size and channel order: resized and reordered, it is the same.
    stream.controlnets.set_image(
        0, np.full((SIZE * 2, SIZE + 8, 4), (90, 40, 200, 255), np.uint8), "bgra"
    )
    from_larger = latents(stream, [frame])
    assert gap(steered, black) > LATENT_GAP
    torch.testing.assert_close(from_larger[0], steered[0], rtol=0, atol=1e-5)


def test_txt2img_takes_a_control_image_from_outside_and_refuses_one_from_the_input(
    tiny, controlnet
):
    stream = stream_of(tiny, [ControlNet(controlnet, "image")], mode="txt2img", **ONE_STEP)
    before = stream.txt2img().float()
    stream.controlnets.set_image(0, pictures(1, seed=3)[0])
    assert (stream.txt2img().float() - before).abs().mean() > 0.5
    with pytest.raises(ValueError, match="txt2img has no input frame; give it a control input"):
        stream_of(tiny, [ControlNet(controlnet, "canny")], mode="txt2img")


def test_an_sdxl_controlnet_steers_an_sdxl_pipeline_and_at_scale_0_it_is_as_without(tiny_xl, cache):
    model = load_controlnet("synthetic:controlnet-tiny-xl", tiny_xl.unet.config, cache_dir=cache)
    frames = pictures(1)
    without = latents(stream_of(tiny_xl, **ONE_STEP), frames)
    steered = latents(stream_of(tiny_xl, [ControlNet(model)], **ONE_STEP), frames)
    at_zero = latents(stream_of(tiny_xl, [ControlNet(model, scale=0.0)], **ONE_STEP), frames)
    assert gap(steered, without) > LATENT_GAP
    torch.testing.assert_close(at_zero[0], without[0], rtol=0, atol=1e-6)


def test_bad_controlnet_uses_are_refused_with_a_sentence(tiny, tiny_xl, controlnet):
    stream = stream_of(tiny, [ControlNet(controlnet, "canny")])
    with pytest.raises(ValueError, match="takes its control image from the input frame"):
        stream.controlnets.set_image(0, pictures(1)[0])
    with pytest.raises(IndexError, match="ControlNet 1 does not exist; this pipeline has 1"):
        stream.controlnets.set_scale(1, 0.5)
    with pytest.raises(ValueError, match="source 'depth'; use one of canny, passthrough, image"):
        stream_of(tiny, [ControlNet(controlnet, "depth")])
    with pytest.raises(ValueError, match="ControlNet 0 has down_block_types .* made for another"):
        StreamDiffusion(
            tiny_xl, StreamConfig(width=SIZE, height=SIZE), controlnets=[ControlNet(controlnet)]
        )
