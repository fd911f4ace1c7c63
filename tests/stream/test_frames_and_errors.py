"""Frames in the layouts video tools use, and errors that say what is allowed."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bridge.stream import StreamConfig, StreamDiffusion, frames
from bridge.stream.frames import mark_uploaded, upload_event
from tests.stream.helpers import SIZE, frame


def test_numpy_rgb_in_gives_numpy_rgb_out(make_stream):
    out = make_stream()(frame(1))
    assert isinstance(out, np.ndarray)
    assert out.shape == (SIZE, SIZE, 3) and out.dtype == np.uint8


def test_tensor_in_gives_tensor_out_on_the_pipeline_device(make_stream):
    out = make_stream()(torch.from_numpy(frame(1)))
    assert isinstance(out, torch.Tensor)
    assert out.shape == (SIZE, SIZE, 3) and out.dtype == torch.uint8


def test_bgra_frames_come_back_bgra_with_opaque_alpha_and_swapped_colours(make_stream):
    rgb = frame(3)
    bgra = np.concatenate([rgb[..., ::-1], np.full((SIZE, SIZE, 1), 7, np.uint8)], axis=-1)
    out_rgb = make_stream()(rgb)
    out_bgra = make_stream()(bgra, pixel_format="bgra")
    assert out_bgra.shape == (SIZE, SIZE, 4)
    assert (out_bgra[..., 3] == 255).all()
    np.testing.assert_array_equal(out_bgra[..., :3], out_rgb[..., ::-1])


def test_rgba_alpha_is_ignored_on_input(make_stream):
    rgb = frame(4)
    rgba_a = np.concatenate([rgb, np.zeros((SIZE, SIZE, 1), np.uint8)], axis=-1)
    rgba_b = np.concatenate([rgb, np.full((SIZE, SIZE, 1), 255, np.uint8)], axis=-1)
    out_a = make_stream()(rgba_a, pixel_format="rgba")
    out_b = make_stream()(rgba_b, pixel_format="rgba")
    np.testing.assert_array_equal(out_a, out_b)


def test_a_frame_batch_comes_back_as_a_batch(make_stream):
    stream = make_stream(frame_buffer_size=2)
    out = stream(frame(1, count=2))
    assert out.shape == (2, SIZE, SIZE, 3)


def test_the_input_image_shapes_the_output(make_stream):
    stream = make_stream(t_index_list=(45,), cfg_type="none")
    flat = stream(np.full((SIZE, SIZE, 3), 128, np.uint8)).astype(int)
    busy = stream(frame(9)).astype(int)
    assert np.abs(flat - busy).max() > 0


def test_the_full_vae_works_as_well_as_the_tiny_one(tiny_full_vae):
    config = StreamConfig(width=SIZE, height=SIZE, t_index_list=(32, 45))
    stream = StreamDiffusion(tiny_full_vae, config, prompt="a lighthouse")
    out = stream(frame(1))
    assert out.shape == (SIZE, SIZE, 3)


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        (np.zeros((SIZE, SIZE, 3), np.float32), "must be uint8, got dtype float32"),
        (np.zeros((SIZE, SIZE + 8, 3), np.uint8), r"frame shape \(64, 72, 3\) does not match"),
        (np.zeros((SIZE, SIZE, 4), np.uint8), r"frame shape \(64, 64, 4\) does not match"),
        ([[0, 1], [2, 3]], "must be a numpy array or a torch tensor, got list"),
    ],
)
def test_a_malformed_frame_is_refused_with_what_was_expected(make_stream, bad, message):
    with pytest.raises(ValueError, match=message):
        make_stream()(bad)


def test_an_unknown_pixel_format_is_refused(make_stream):
    with pytest.raises(ValueError, match="pixel format 'yuv' is unknown; use one of rgb"):
        make_stream()(frame(1), pixel_format="yuv")


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"width": 500}, "width must be a multiple of 8.*got 500; try 496 or 504"),
        ({"height": 0}, "height must be between 8 and 4096, got 0"),
        ({"t_index_list": (10, 50)}, "t_index 50 is outside the schedule of 50 steps"),
        ({"t_index_list": (30, 20)}, r"strictly increasing, got \[30, 20\]"),
        ({"t_index_list": ()}, "t_index_list must hold 1 to 50"),
        ({"cfg_type": "half"}, "cfg_type must be one of none, full, self, initialize, got 'half'"),
        ({"guidance_scale": float("nan")}, "guidance_scale must be a finite number"),
        ({"mode": "video"}, "mode must be one of img2img, txt2img, got 'video'"),
        ({"noise": "wobble"}, "noise must be one of fixed, fresh, drift, got 'wobble'"),
        ({"noise_drift": 2.0}, "noise_drift must be between 0.0 and 1.5708, got 2.0"),
        ({"noise_drift": -0.1}, "noise_drift must be between 0.0 and 1.5708, got -0.1"),
        ({"frame_buffer_size": 0}, "frame_buffer_size must be between 1 and 64, got 0"),
    ],
)
def test_bad_settings_raise_a_value_error_naming_the_value(settings, message):
    with pytest.raises(ValueError, match=message):
        StreamConfig(**settings)


def test_a_bad_live_change_is_refused_and_the_stream_keeps_its_settings(make_stream):
    stream = make_stream(cfg_type="self")
    with pytest.raises(ValueError, match="cfg_type must be one of"):
        stream.update(cfg_type="bogus")
    assert stream.config.cfg_type == "self"
    stream(frame(1))


def test_img2img_without_a_frame_and_txt2img_with_one_are_refused(make_stream):
    with pytest.raises(ValueError, match="img2img mode needs an input frame"):
        make_stream()()
    with pytest.raises(ValueError, match="txt2img mode takes no input frame"):
        make_stream(mode="txt2img")(frame(1))


def test_an_uploaded_frame_is_known_by_its_upload_event_and_no_other_frame_is():
    pixels, copy_of_it = torch.zeros((2, 2, 3), dtype=torch.uint8), torch.zeros((2, 2, 3))
    event = object()  # what the upload recorded; only its identity matters here
    mark_uploaded(pixels, event)
    assert upload_event(pixels) is event
    assert upload_event(copy_of_it) is None and upload_event(pixels.unsqueeze(0)) is None
    assert upload_event(frame(1)) is None
    address = id(pixels)
    del pixels
    assert frames._UPLOADS[address][0]() is None  # the note does not keep a frame alive
    # Python soon gives the freed frame's id to a new object, which must not pass for it.
    others = [torch.zeros((2, 2, 3), dtype=torch.uint8) for _ in range(50)]
    (reused,) = [other for other in others if id(other) == address]
    assert upload_event(reused) is None
    newer, its_event = torch.ones(1), object()
    mark_uploaded(newer, its_event)  # and noting a new upload forgets the freed ones
    assert all(alive() is not None for alive, _ in frames._UPLOADS.values())
    assert upload_event(newer) is its_event
