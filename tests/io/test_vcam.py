"""vcam: the missing-library sentence for real, the sink's logic against a stand-in library.

pyvirtualcam and a virtual camera device are not available where these tests run; the
stand-in below mirrors the documented `pyvirtualcam.Camera(width, height, fps, fmt=, device=)`
and `send(frame)` calls and records them.
"""

from __future__ import annotations

import importlib.util
import sys
from types import SimpleNamespace

import numpy as np
import pytest

from bridge.io import Frame, TransportError, open_sink
from bridge.io.vcam import VirtualCameraSink


class RecordingCamera:
    opened: list[dict] = []

    def __init__(self, width, height, fps, *, fmt, device=None):
        self.width, self.height, self.device = width, height, device or "/dev/video9"
        self.sent: list[np.ndarray] = []
        self.closed = False
        RecordingCamera.opened.append(
            {"size": (width, height), "fps": fps, "fmt": fmt, "device": device, "camera": self}
        )

    def send(self, frame):
        assert frame.shape == (self.height, self.width, 3) and frame.dtype == np.uint8
        self.sent.append(frame.copy())

    def close(self):
        self.closed = True


def stand_in(camera=RecordingCamera):
    return SimpleNamespace(Camera=camera, PixelFormat=SimpleNamespace(RGB="RGB"))


@pytest.mark.skipif(
    importlib.util.find_spec("pyvirtualcam") is not None, reason="pyvirtualcam is installed"
)
def test_missing_pyvirtualcam_says_what_to_install():
    with pytest.raises(TransportError) as refused:
        open_sink("vcam", width=64, height=64)
    message = str(refused.value)
    assert "pip install streamdiffusion-bridge[vcam]" in message
    assert ("v4l2loopback" in message) == sys.platform.startswith("linux")


def test_frames_go_out_as_rgb_fitted_to_the_camera_size():
    RecordingCamera.opened.clear()
    sink = VirtualCameraSink(32, 16, device="/dev/video9", fps=25, pyvirtualcam=stand_in())
    with sink:
        bgra = np.zeros((40, 80, 4), np.uint8)
        bgra[..., 0] = 200  # blue
        sink.write(Frame(bgra, "bgra", 0.0, 0))
    record = RecordingCamera.opened[0]
    assert (record["size"], record["fps"], record["fmt"], record["device"]) == (
        (32, 16),
        25,
        "RGB",
        "/dev/video9",
    )
    sent = record["camera"].sent[0]
    assert sent[..., 2].min() == 200 and sent[..., :2].max() == 0
    assert record["camera"].closed


def test_a_camera_that_cannot_start_is_reported_with_what_to_install():
    def no_device(*args, **kwargs):
        raise RuntimeError("'/dev/video9' is not a video loopback device")

    with pytest.raises(TransportError, match="No virtual camera could be started"):
        VirtualCameraSink(8, 8, pyvirtualcam=stand_in(no_device)).open()
