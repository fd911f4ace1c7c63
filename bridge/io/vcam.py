"""`vcam[:<device>]`: a virtual camera through pyvirtualcam.

Backends: OBS Virtual Camera or Unity Capture on Windows, OBS Virtual Camera on macOS,
v4l2loopback on Linux (`/dev/videoN` as the device). OBS's own virtual camera serves one
sender at a time, so the bridge cannot use it while OBS itself outputs to it.

Viewers expect a camera to keep its size, so the camera is created at the size the sink was
opened at and every frame is fitted to it. Frames go out as rgb.
"""

from __future__ import annotations

import sys
from typing import Any

from bridge.io.base import Sink, TransportError
from bridge.io.frame import Frame


class VirtualCameraSink(Sink):
    """Sends frames to a virtual camera that video apps and OBS can capture."""

    def __init__(
        self,
        width: int,
        height: int,
        *,
        device: str | None = None,
        fps: float = 30.0,
        pyvirtualcam: Any = None,
    ):
        """`pyvirtualcam` replaces the imported library, for tests without a virtual camera."""
        super().__init__()
        self.width = width
        self.height = height
        self.device = device
        self.fps = fps
        self._library = pyvirtualcam
        self._camera: Any = None

    @property
    def connected(self) -> bool:
        return self._camera is not None

    def describe(self) -> str:
        where = self._camera.device if self._camera is not None else self.device or "first free"
        return f"vcam:{where} {self.width}x{self.height} @ {self.fps:g} fps"

    def _open(self) -> None:
        library = self._library or import_pyvirtualcam()
        try:
            self._camera = library.Camera(
                self.width,
                self.height,
                self.fps,
                fmt=library.PixelFormat.RGB,
                device=self.device,
            )
        except (RuntimeError, ValueError) as error:
            raise TransportError(
                f"No virtual camera could be started ({error}); {_HOW_TO_GET_ONE}"
            ) from error

    def _close(self) -> None:
        self._camera.close()
        self._camera = None

    def _write(self, frame: Frame) -> None:
        self._camera.send(frame.fitted(self.width, self.height).to("rgb").pixels)


_ON_LINUX = sys.platform.startswith("linux")
if _ON_LINUX:
    _HOW_TO_GET_ONE = "load v4l2loopback (sudo modprobe v4l2loopback exclusive_caps=1) first."
else:
    _HOW_TO_GET_ONE = "install OBS Studio, whose virtual camera it drives, or Unity Capture."


def import_pyvirtualcam() -> Any:
    """The pyvirtualcam module, or TransportError saying what to install."""
    try:
        import pyvirtualcam
    except ImportError as error:
        extra = " and load the v4l2loopback kernel module" if _ON_LINUX else ""
        raise TransportError(
            "The virtual camera needs pyvirtualcam, which is not installed; run "
            f"pip install streamdiffusion-bridge[vcam]{extra}."
        ) from error
    return pyvirtualcam
