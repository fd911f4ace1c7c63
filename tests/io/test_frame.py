"""Frames: validation, pixel format conversion and fitting to a working size."""

from __future__ import annotations

import numpy as np
import pytest

from bridge.io.frame import Frame, convert_pixels, fit_pixels


def pixel(*values: int) -> np.ndarray:
    return np.array(values, np.uint8).reshape(1, 1, len(values))


@pytest.mark.parametrize(
    ("source", "values", "target", "expected"),
    [
        ("rgb", (1, 2, 3), "bgr", (3, 2, 1)),
        ("rgba", (1, 2, 3, 4), "bgra", (3, 2, 1, 4)),
        ("bgra", (3, 2, 1, 4), "rgb", (1, 2, 3)),
        ("rgb", (1, 2, 3), "rgba", (1, 2, 3, 255)),
        ("bgr", (3, 2, 1), "bgra", (3, 2, 1, 255)),
    ],
)
def test_conversion_reorders_drops_or_adds_opaque_alpha(source, values, target, expected):
    assert convert_pixels(pixel(*values), source, target).ravel().tolist() == list(expected)


def test_frame_refuses_pixels_that_do_not_match_its_format():
    with pytest.raises(ValueError, match="3 channels but pixel format 'rgba' needs 4"):
        Frame(np.zeros((2, 2, 3), np.uint8), "rgba", 0.0, 0)
    with pytest.raises(ValueError, match="uint8 array"):
        Frame(np.zeros((2, 2, 3), np.float32), "rgb", 0.0, 0)
    with pytest.raises(ValueError, match="C-contiguous"):
        Frame(np.zeros((2, 4, 3), np.uint8)[:, ::2], "rgb", 0.0, 0)
    with pytest.raises(ValueError, match="Unknown pixel format 'yuv'"):
        Frame(np.zeros((2, 2, 3), np.uint8), "yuv", 0.0, 0)


def test_frame_conversion_keeps_time_and_index():
    frame = Frame(np.zeros((2, 2, 4), np.uint8), "bgra", 12.5, 7).to("rgb")
    assert (frame.pixel_format, frame.capture_time, frame.index) == ("rgb", 12.5, 7)


def test_fitting_crops_the_centre_instead_of_stretching():
    # A white band on the left fifth of a 2:1 picture lies outside its centred square.
    wide = np.zeros((50, 100, 3), np.uint8)
    wide[:, :20] = 255
    square = fit_pixels(wide, 40, 40)
    assert square.shape == (40, 40, 3)
    assert square.max() < 30


def test_fitting_keeps_the_layout_of_the_centre():
    picture = np.zeros((60, 80, 4), np.uint8)
    picture[:30] = 255  # top half bright
    fitted = fit_pixels(picture, 20, 10)
    assert fitted.shape == (10, 20, 4)
    assert fitted[1].min() > 200 and fitted[-2].max() < 50


def test_fitting_keeps_the_colour_of_transparent_pixels():
    transparent_red = np.zeros((30, 60, 4), np.uint8)
    transparent_red[..., 0] = 200
    fitted = fit_pixels(transparent_red, 10, 10)
    assert fitted.shape == (10, 10, 4)
    assert fitted[..., 0].min() == 200 and fitted[..., 3].max() == 0
