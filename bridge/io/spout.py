"""`spout:<sender name>`: GPU texture sharing on Windows through SpoutGL (`pip install SpoutGL`).

SpoutGL needs an OpenGL context current on the thread that calls it. Each Spout source or sink
therefore runs its own thread, which asks SpoutGL for a hidden window and context of its own
(`createOpenGL`, part of the Spout SDK) and makes every SpoutGL call there; no other OpenGL
package is needed. Frames cross to and from that thread through a one-frame slot.

A sender's texture is RGBA (TouchDesigner) or BGRA (Spout's default); the source asks for
pixels in the sender's own order, so Spout copies them without swizzling, and frames carry that
pixel format. When the sender changes size, the receive buffer follows. An empty name
(`spout:`) receives from the active sender.

`SpoutFrameReceiver` and `pixel_format_for_sender` hold that logic apart from threads and the
library, so they can be checked against a stand-in of SpoutGL where Spout cannot run.
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Callable
from types import ModuleType
from typing import Any

import numpy as np

from bridge.io.base import Sink, Source, TransportError
from bridge.io.frame import Frame, now
from bridge.io.slot import FrameSlot

# Seconds the Spout thread waits between two polls of the sender when nothing new came.
POLL_INTERVAL = 0.002
OPEN_TIMEOUT = 10.0

# DXGI (and Direct3D 9) texture formats whose bytes run R, G, B, A; all others are read as BGRA,
# Spout's default. 2, 10, 11 and 24 are float and 10-bit formats that Spout converts to 8 bits.
_RGBA_ORDER = frozenset({2, 10, 11, 24, 28, 29})  # R8G8B8A8_UNORM is 28

_GL_ENUM_OF_FORMAT = {
    "rgba": "GL_RGBA",
    "bgra": "GL_BGRA_EXT",
    "rgb": "GL_RGB",
    "bgr": "GL_BGR_EXT",
}


def pixel_format_for_sender(texture_format: int) -> str:
    """Byte order of a sender's texture, from the format code `getSenderFormat` reports."""
    return "rgba" if texture_format in _RGBA_ORDER else "bgra"


def gl_format(enums: Any, pixel_format: str) -> int:
    """The OpenGL format constant, from `SpoutGL.enums`, for one of our pixel formats."""
    return int(getattr(enums, _GL_ENUM_OF_FORMAT[pixel_format]))


class SpoutFrameReceiver:
    """One receive step at a time against a `SpoutGL.SpoutReceiver`, with no thread of its own.

    Follows the sender: on an update (first contact, new size, new format) it reallocates the
    buffer at the sender's size and picks the byte order from the sender's format.
    """

    def __init__(self, receiver: Any, enums: Any, sender_name: str):
        self._receiver = receiver
        self._enums = enums
        if sender_name:
            receiver.setReceiverName(sender_name)
        self.pixel_format = "bgra"
        self._gl_format = gl_format(enums, self.pixel_format)
        self._buffer: np.ndarray | None = None

    def poll(self) -> tuple[np.ndarray, str] | None:
        """A copy of a new frame and its pixel format, or None when there is none this time."""
        receiver = self._receiver
        received = receiver.receiveImage(self._buffer, self._gl_format, False, 0)
        if receiver.isUpdated():
            width, height = receiver.getSenderWidth(), receiver.getSenderHeight()
            self.pixel_format = pixel_format_for_sender(receiver.getSenderFormat())
            self._gl_format = gl_format(self._enums, self.pixel_format)
            self._buffer = np.zeros((height, width, 4), np.uint8) if width and height else None
            return None
        if not received or self._buffer is None or not receiver.isFrameNew():
            return None
        return self._buffer.copy(), self.pixel_format


class SpoutSource(Source):
    """Receives a Spout sender's frames on a thread with its own OpenGL context."""

    def __init__(self, name: str, width: int, height: int, *, spoutgl: ModuleType | None = None):
        """`spoutgl` replaces the imported SpoutGL module, for tests where Spout cannot run."""
        super().__init__()
        self.name = name
        self.width = width
        self.height = height
        self._module = spoutgl
        self._slot = FrameSlot()
        self._worker = _SpoutThread(self._receive_until_stopped)

    @property
    def connected(self) -> bool:
        return self._worker.connected

    def describe(self) -> str:
        return f"spout:{self.name or '(active sender)'}"

    def _open(self) -> None:
        self._worker.start(self._module or load_spoutgl(), self.describe())

    def _close(self) -> None:
        self._worker.stop()

    def _read(self, timeout: float) -> Frame | None:
        self._worker.raise_failure()
        return self._slot.take(timeout)

    def _receive_until_stopped(self, module: Any, worker: _SpoutThread) -> None:
        receiver = module.SpoutReceiver()
        try:
            if not receiver.createOpenGL():
                worker.failure = _NO_CONTEXT
                return
            logic = SpoutFrameReceiver(receiver, module.enums, self.name)
            worker.ready.set()
            index = 0
            while not worker.stopping.is_set():
                got = logic.poll()
                worker.connected = bool(receiver.isConnected())
                if got is None:
                    worker.stopping.wait(POLL_INTERVAL)
                    continue
                pixels, pixel_format = got
                frame = Frame(pixels, pixel_format, now(), index)
                self._slot.put(frame.fitted(self.width, self.height))
                index += 1
        finally:
            receiver.releaseReceiver()
            receiver.closeOpenGL()


class SpoutSink(Sink):
    """Publishes frames as a Spout sender, from a thread with its own OpenGL context.

    `write` hands the frame over and returns at once; if the Spout thread is still busy with an
    earlier frame, that earlier frame is replaced, never queued.
    """

    def __init__(self, name: str, *, spoutgl: ModuleType | None = None):
        """`spoutgl` replaces the imported SpoutGL module, for tests where Spout cannot run."""
        super().__init__()
        if not name:
            raise ValueError("A Spout sink needs a sender name, e.g. spout:sd-bridge.")
        self.name = name
        self._module = spoutgl
        self._slot = FrameSlot()
        self._worker = _SpoutThread(self._send_until_stopped)

    @property
    def connected(self) -> bool:
        return self._worker.connected

    def describe(self) -> str:
        return f"spout:{self.name}"

    def _open(self) -> None:
        self._worker.start(self._module or load_spoutgl(), self.describe())

    def _close(self) -> None:
        self._worker.stop()

    def _write(self, frame: Frame) -> None:
        self._worker.raise_failure()
        self._slot.put(frame)

    def _send_until_stopped(self, module: Any, worker: _SpoutThread) -> None:
        sender = module.SpoutSender()
        try:
            if not sender.createOpenGL():
                worker.failure = _NO_CONTEXT
                return
            sender.setSenderName(self.name)
            worker.ready.set()
            while not worker.stopping.is_set():
                frame = self._slot.take(POLL_INTERVAL * 50)
                if frame is None:
                    continue
                sent = sender.sendImage(
                    frame.pixels,
                    frame.width,
                    frame.height,
                    gl_format(module.enums, frame.pixel_format),
                    False,
                    0,
                )
                if sent:
                    sender.setFrameSync(self.name)
                worker.connected = bool(sent)
        finally:
            sender.releaseSender()
            sender.closeOpenGL()


_NO_CONTEXT = (
    "Spout could not create its hidden OpenGL context; update the graphics driver so that "
    "OpenGL works on this machine."
)

_SpoutLoop = Callable[[Any, "_SpoutThread"], None]


class _SpoutThread:
    """The one thread that makes every SpoutGL call of a source or sink, and what it reports."""

    def __init__(self, loop: _SpoutLoop):
        self._loop = loop
        self._thread: threading.Thread | None = None
        self._description = ""
        self.stopping = threading.Event()
        self.ready = threading.Event()
        self.failure: str | None = None
        self.connected = False

    def start(self, module: Any, description: str) -> None:
        """Start the loop and wait until it receives or sends, or raise why it could not."""
        self._description = description
        self.stopping.clear()
        self.ready.clear()
        self.failure = None
        self._thread = threading.Thread(
            target=self._run, args=(module,), name=description, daemon=True
        )
        self._thread.start()
        if not self.ready.wait(OPEN_TIMEOUT):
            self.stop()
            raise TransportError(
                f"{description} did not start within {OPEN_TIMEOUT:g} s; check that Spout "
                "works with the Spout demo programs."
            )
        if self.failure is not None:
            self.stop()
            raise TransportError(self.failure)

    def stop(self) -> None:
        """Ask the loop to end and wait for it to release Spout and its OpenGL context."""
        self.stopping.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def raise_failure(self) -> None:
        """Raise TransportError if the loop died, so the caller hears of it."""
        if self.failure is not None:
            raise TransportError(self.failure)

    def _run(self, module: Any) -> None:
        try:
            self._loop(module, self)
        except Exception as error:  # the thread cannot raise to its caller: report instead
            self.failure = f"{self._description} stopped ({error}); reopen it to try again."
        finally:
            self.connected = False
            self.ready.set()


def load_spoutgl() -> ModuleType:
    """The SpoutGL module, or TransportError saying why it cannot be used here."""
    if sys.platform != "win32":
        raise TransportError(
            "Spout is Windows-only; on this system use shm:<name> to exchange frames with "
            "TouchDesigner or OBS."
        )
    try:
        import SpoutGL
    except ImportError as error:
        raise TransportError(
            "Spout needs SpoutGL, which is not installed; run "
            "pip install streamdiffusion-bridge[spout]."
        ) from error
    return SpoutGL


def list_senders(spoutgl: ModuleType | None = None) -> list[tuple[str, int, int]]:
    """Name, width and height of every running Spout sender (empty where SpoutGL cannot say)."""
    module = spoutgl or load_spoutgl()
    receiver = module.SpoutReceiver()
    try:
        senders = []
        for name in receiver.getSenderList():
            info = receiver.getSenderInfo(name)
            senders.append((str(name), int(info.width), int(info.height)))
        return senders
    except AttributeError:  # older SpoutGL releases cannot list senders
        return []
    finally:
        receiver.releaseReceiver()
