"""cam: through OpenCV, on a real video file and on a camera that is not there."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest

from bridge.io import TransportError, open_source
from bridge.io.camera import parse_device

pytest.importorskip("cv2")


def test_capture_device_frames_arrive_as_bgr_at_the_requested_size(tiny_video, video_colours):
    with open_source(f"cam:{tiny_video}", width=32, height=24) as source:
        frame = source.read(timeout=5.0)
        assert frame is not None
        assert frame.pixels.shape == (24, 32, 3) and frame.pixel_format == "bgr"
        centre = frame.pixels[12, 16].astype(int)
        as_bgr = [np.array(colour[::-1]) for colour in video_colours]
        assert min(np.abs(centre - colour).max() for colour in as_bgr) <= 12

        # The file ends after five frames: the device stops delivering and says so.
        deadline = time.monotonic() + 5.0
        while source.connected and time.monotonic() < deadline:
            time.sleep(0.01)
        assert not source.connected


def test_absent_camera_is_named_and_points_to_sd_bridge_list():
    index = next(i for i in range(10, 64) if not Path(f"/dev/video{i}").exists())
    with pytest.raises(TransportError) as refused:
        open_source(f"cam:{index}", width=8, height=8)
    assert str(refused.value) == (
        f"Camera {index} could not be opened; run `sd-bridge list` to see the cameras on this "
        "machine."
    )


def test_absent_device_path_is_named_in_the_error():
    with pytest.raises(TransportError, match=r"Camera '/dev/video-none' could not be opened"):
        open_source("cam:/dev/video-none", width=8, height=8)


def test_device_text_is_an_index_for_digits_and_a_path_otherwise():
    assert parse_device("2") == 2
    assert parse_device("/dev/video2") == "/dev/video2"
    with pytest.raises(ValueError, match="cam: needs a camera index or device path"):
        parse_device("")
