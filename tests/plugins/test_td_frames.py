"""Frames between TOPs and shared memory (toe/sdb_frames.py), through real shared memory.

The other side of each stream is the bridge's own reader or writer, so orientation, channel
order and the protocol are checked where they meet.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import numpy as np
import pytest
import sdb_frames

from bridge.io.shm_protocol import ShmReader, ShmWriter


@pytest.fixture
def name() -> Iterator[str]:
    """A stream name of this test run alone."""
    yield f"tdt{os.getpid() % 100000}"


def top_image(height: int = 4, width: int = 3) -> np.ndarray:
    """A float RGBA image as TouchDesigner hands it over: row 0 is the bottom row.

    Red grows with the row from the bottom, green with the column, blue is 0.5, alpha 1.
    """
    image = np.zeros((height, width, 4), np.float32)
    image[:, :, 0] = (np.arange(height) / (height - 1))[:, None]
    image[:, :, 1] = (np.arange(width) / (width - 1))[None, :]
    image[:, :, 2] = 0.5
    image[:, :, 3] = 1.0
    return image


def test_a_top_image_becomes_8_bit_rgba_with_the_top_row_first() -> None:
    frame = sdb_frames.top_to_frame(top_image())
    assert frame.dtype == np.uint8 and frame.shape == (4, 3, 4)
    assert frame[0, 0].tolist() == [255, 0, 128, 255]  # the top row is the reddest
    assert frame[3, 0].tolist() == [0, 0, 128, 255]
    assert frame[0, 2].tolist() == [255, 255, 128, 255]


def test_values_outside_zero_to_one_are_clipped_and_three_channels_get_opaque_alpha() -> None:
    image = np.array([[[-0.5, 0.5, 2.0]]], np.float32)
    assert sdb_frames.top_to_frame(image)[0, 0].tolist() == [0, 128, 255, 255]


def test_a_mono_image_becomes_grey() -> None:
    image = np.array([[[0.2]], [[1.0]]], np.float32)
    frame = sdb_frames.top_to_frame(image)
    assert frame[:, 0].tolist() == [[255, 255, 255, 255], [51, 51, 51, 255]]


def test_a_frame_in_bgr_order_becomes_rgba_with_the_bottom_row_first() -> None:
    pixels = np.zeros((2, 1, 3), np.uint8)
    pixels[0, 0] = (10, 20, 30)  # top row, blue green red
    pixels[1, 0] = (40, 50, 60)
    image = sdb_frames.frame_to_top(pixels, "bgr")
    assert image.dtype == np.uint8 and image.shape == (2, 1, 4)
    assert image[1, 0].tolist() == [30, 20, 10, 255]  # the top row is last
    assert image[0, 0].tolist() == [60, 50, 40, 255]


def test_an_unknown_pixel_format_is_refused() -> None:
    with pytest.raises(ValueError, match="has rgb, rgba, bgr, bgra"):
        sdb_frames.frame_to_top(np.zeros((1, 1, 4), np.uint8), "argb")


def test_the_bridge_reads_what_the_sender_publishes_top_row_first(name: str) -> None:
    sender = sdb_frames.FrameSender(name)
    reader = ShmReader(name)
    try:
        sender.send(top_image())
        got = reader.read()
        assert got is not None
        pixels, meta = got
        assert meta.pixel_format == "rgba" and (meta.width, meta.height) == (3, 4)
        assert np.array_equal(pixels, sdb_frames.top_to_frame(top_image()))
        assert pixels[0, 0, 0] == 255  # the top row, where TouchDesigner shows the reddest
        sender.send(top_image(height=8, width=6))  # a new size follows by itself
        pixels, meta = reader.read()
        assert (meta.width, meta.height) == (6, 8)
    finally:
        reader.close()
        sender.close()


def test_the_receiver_shows_what_the_bridge_writes_bottom_row_first(name: str) -> None:
    pixels = np.zeros((2, 2, 4), np.uint8)
    pixels[0] = (200, 100, 50, 255)  # top row in bgra: red 50, green 100, blue 200
    pixels[1] = (1, 2, 3, 4)
    receiver = sdb_frames.FrameReceiver(name)
    with ShmWriter(name, 2, 2, "bgra") as writer:
        writer.write(pixels)
        assert receiver.connected
        image = receiver.receive()
        assert image is not None
        assert image[1, 0].tolist() == [50, 100, 200, 255]
        assert image[0, 0].tolist() == [3, 2, 1, 4]
        assert receiver.receive() is None  # nothing new since
    receiver.close()


def test_a_round_trip_through_shared_memory_gives_back_the_top_image(name: str) -> None:
    image = top_image(height=5, width=7)
    sender = sdb_frames.FrameSender(name)
    receiver = sdb_frames.FrameReceiver(name)
    try:
        sender.send(image)
        back = receiver.receive()
        assert back is not None
        assert np.array_equal(back, np.floor(image * 255 + 0.5).astype(np.uint8))
    finally:
        receiver.close()
        sender.close()
