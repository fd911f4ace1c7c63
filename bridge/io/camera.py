"""`cam:<index or device path>`: webcams and virtual cameras (OBS Virtual Camera) via OpenCV.

A thread reads the camera as fast as it delivers and keeps only the newest frame, so OpenCV's
internal queue never adds latency. On Windows, numbered cameras open through DirectShow: the
OBS Virtual Camera is a DirectShow device that Media Foundation does not list. A video file
path also works, read as fast as it decodes (use `file:` to play a file at its own speed).
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from bridge.io.base import Source, TransportError
from bridge.io.frame import Frame, now
from bridge.io.slot import FrameSlot

# After this many failed reads in a row the camera counts as disconnected.
FAILED_READS_BEFORE_DISCONNECT = 3
RETRY_DELAY = 0.05


class CameraSource(Source):
    """Grabs frames from an OpenCV capture device on a thread of its own; frames are bgr."""

    def __init__(self, device: int | str, width: int, height: int):
        super().__init__()
        self.device = device
        self.width = width
        self.height = height
        self._capture: Any = None
        self._slot = FrameSlot()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._failed_reads = 0

    @property
    def connected(self) -> bool:
        return self._capture is not None and self._failed_reads < FAILED_READS_BEFORE_DISCONNECT

    def describe(self) -> str:
        return f"cam:{self.device}"

    def _open(self) -> None:
        self._capture = open_capture(self.device)
        if isinstance(self.device, int):
            # Ask for the working size; the camera picks its nearest mode and fitting does the rest.
            cv2 = import_cv2()
            self._capture.set(cv2.CAP_PROP_FRAME_WIDTH, self.width)
            self._capture.set(cv2.CAP_PROP_FRAME_HEIGHT, self.height)
        self._stop.clear()
        self._failed_reads = 0
        self._thread = threading.Thread(
            target=self._grab_until_stopped, name=f"camera-{self.device}", daemon=True
        )
        self._thread.start()

    def _close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        self._capture.release()
        self._capture = None

    def _read(self, timeout: float) -> Frame | None:
        return self._slot.take(timeout)

    def _grab_until_stopped(self) -> None:
        index = 0
        while not self._stop.is_set():
            ok, pixels = self._capture.read()
            captured = now()
            if not ok or pixels is None:
                self._failed_reads += 1
                self._stop.wait(RETRY_DELAY)
                continue
            self._failed_reads = 0
            frame = Frame(pixels, "bgr", captured, index).fitted(self.width, self.height)
            self._slot.put(frame)
            index += 1


def open_capture(device: int | str) -> Any:
    """An opened `cv2.VideoCapture`, or TransportError naming the camera and `sd-bridge list`."""
    cv2 = import_cv2()
    with _quiet(cv2):
        if isinstance(device, int) and sys.platform == "win32":
            capture = cv2.VideoCapture(device, cv2.CAP_DSHOW)
        else:
            capture = cv2.VideoCapture(device)
    if not capture.isOpened():
        capture.release()
        what = f"Camera {device}" if isinstance(device, int) else f"Camera {str(device)!r}"
        raise TransportError(
            f"{what} could not be opened; run `sd-bridge list` to see the cameras on this machine."
        )
    return capture


def parse_device(text: str) -> int | str:
    """A camera index for digits, else a device path (e.g. /dev/video2) kept as given."""
    text = text.strip()
    if not text:
        raise ValueError("cam: needs a camera index or device path, e.g. cam:0.")
    return int(text) if text.isdigit() else text


def probe_cameras(limit: int = 4) -> list[int | str]:
    """Cameras that open, checked cheaply: /dev/video* on Linux, else indices until one fails."""
    if sys.platform.startswith("linux"):
        nodes = sorted(Path("/dev").glob("video[0-9]*"), key=lambda p: int(p.name[5:]))
        candidates: list[int | str] = [str(path) for path in nodes[:limit]]
        return [device for device in candidates if _opens(device)]
    found: list[int | str] = []
    for index in range(limit):
        if not _opens(index):
            break
        found.append(index)
    return found


@contextmanager
def _quiet(cv2: Any) -> Iterator[None]:
    """Silence OpenCV's own warnings: a missing camera gets one clear sentence from us instead."""
    previous_level = cv2.utils.logging.getLogLevel()
    cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_SILENT)
    try:
        yield
    finally:
        cv2.utils.logging.setLogLevel(previous_level)


def _opens(device: int | str) -> bool:
    try:
        open_capture(device).release()
    except TransportError:
        return False
    return True


def import_cv2() -> Any:
    """The cv2 module, or TransportError saying how to install it."""
    try:
        import cv2
    except ImportError as error:
        raise TransportError(
            "Cameras need OpenCV, which is not installed; run "
            "pip install streamdiffusion-bridge[camera]."
        ) from error
    return cv2
