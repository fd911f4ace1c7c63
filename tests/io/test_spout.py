"""spout: logic checked against a recorded stand-in of the SpoutGL API; Spout itself is not run.

Spout needs Windows, a GPU and another Spout application, none of which these tests have. The
stand-in below mirrors what the SpoutGL binding does for the calls the bridge makes (see
Python-SpoutGL's PySpoutGL.cpp and its examples): `receiveImage(None, ...)` makes contact and
flags an update, an update is flagged again whenever the sender's size or format changes,
`receiveImage` into a buffer smaller than the sender's image raises, and `isFrameNew` tells a
new frame from a repeated one. Every call is recorded with the thread that made it.

What is not covered here: the real DLL, the hidden OpenGL context `createOpenGL` makes, GPU
texture sharing, and TouchDesigner or OBS as the other side.
"""

from __future__ import annotations

import sys
import threading
import time
from types import SimpleNamespace

import numpy as np
import pytest

from bridge.io import Frame, TransportError, open_sink, open_source
from bridge.io.spout import (
    SpoutFrameReceiver,
    SpoutSink,
    SpoutSource,
    list_senders,
    pixel_format_for_sender,
)

GL_RGBA, GL_BGRA_EXT, GL_RGB, GL_BGR_EXT = 0x1908, 0x80E1, 0x1907, 0x80E0
ENUMS = SimpleNamespace(
    GL_RGBA=GL_RGBA, GL_BGRA_EXT=GL_BGRA_EXT, GL_RGB=GL_RGB, GL_BGR_EXT=GL_BGR_EXT
)
DXGI_R8G8B8A8 = 28  # what TouchDesigner's Spout Out TOP shares
DXGI_B8G8R8A8 = 87  # Spout's default


class OtherApplication:
    """The Spout sender on the other side: its texture, in its own byte order, and a counter."""

    def __init__(self):
        self.lock = threading.Lock()
        self.texture: np.ndarray | None = None
        self.texture_format = 0
        self.frame = 0

    def publish(self, texture: np.ndarray, texture_format: int) -> None:
        with self.lock:
            self.texture, self.texture_format = texture.copy(), texture_format
            self.frame += 1


class Recorder:
    def __init__(self):
        self.calls: list[tuple[str, int, tuple]] = []

    def record(self, name: str, *arguments) -> None:
        self.calls.append((name, threading.get_ident(), arguments))

    def names(self) -> list[str]:
        return [name for name, _, _ in self.calls]

    def threads(self) -> set[int]:
        return {thread for _, thread, _ in self.calls}


class StandInReceiver(Recorder):
    def __init__(self, sender: OtherApplication, gl_works: bool = True):
        super().__init__()
        self.sender, self.gl_works = sender, gl_works
        self.seen: tuple | None = None
        self.seen_frame = 0
        self.updated = self.new = False

    def createOpenGL(self):
        self.record("createOpenGL")
        return self.gl_works

    def setReceiverName(self, name):
        self.record("setReceiverName", name)

    def receiveImage(self, buffer, gl_format, invert, host_fbo):
        self.record("receiveImage", None if buffer is None else buffer.shape, gl_format)
        with self.sender.lock:
            texture, texture_format = self.sender.texture, self.sender.texture_format
            frame = self.sender.frame
        self.updated = self.new = False
        if texture is None:
            return False
        shape = (texture.shape, texture_format)
        if buffer is None or shape != self.seen:
            self.seen, self.updated = shape, True
            return True
        if buffer.nbytes < texture.nbytes:
            raise BufferError("Buffer not large enough")
        sender_order = "rgba" if texture_format == DXGI_R8G8B8A8 else "bgra"
        wanted = {GL_RGBA: "rgba", GL_BGRA_EXT: "bgra"}[gl_format]
        buffer[...] = texture if sender_order == wanted else texture[..., [2, 1, 0, 3]]
        self.new, self.seen_frame = frame != self.seen_frame, frame
        return True

    def isUpdated(self):
        return self.updated

    def isFrameNew(self):
        return self.new

    def isConnected(self):
        return self.sender.texture is not None

    def getSenderWidth(self):
        return self.seen[0][1]

    def getSenderHeight(self):
        return self.seen[0][0]

    def getSenderFormat(self):
        return self.seen[1]

    def releaseReceiver(self):
        self.record("releaseReceiver")

    def closeOpenGL(self):
        self.record("closeOpenGL")


class StandInSender(Recorder):
    def createOpenGL(self):
        self.record("createOpenGL")
        return True

    def setSenderName(self, name):
        self.record("setSenderName", name)

    def sendImage(self, pixels, width, height, gl_format, invert, host_fbo):
        self.record("sendImage", width, height, gl_format, bytes(pixels[0, 0]))
        return True

    def setFrameSync(self, name):
        self.record("setFrameSync", name)

    def releaseSender(self):
        self.record("releaseSender")

    def closeOpenGL(self):
        self.record("closeOpenGL")


def stand_in_spoutgl(receiver=None, sender=None):
    return SimpleNamespace(SpoutReceiver=lambda: receiver, SpoutSender=lambda: sender, enums=ENUMS)


def texture(height: int, width: int) -> np.ndarray:
    return np.arange(height * width * 4, dtype=np.uint8).reshape(height, width, 4)


def wait_until(condition, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "the Spout thread did not get there in time"
        time.sleep(0.002)


def test_sender_formats_map_to_byte_orders():
    assert pixel_format_for_sender(DXGI_R8G8B8A8) == "rgba"
    assert pixel_format_for_sender(DXGI_B8G8R8A8) == "bgra"
    assert pixel_format_for_sender(0) == "bgra"  # unknown: Spout's default


def test_receiver_asks_in_the_senders_byte_order_and_follows_its_size():
    other = OtherApplication()
    receiver = StandInReceiver(other)
    logic = SpoutFrameReceiver(receiver, ENUMS, "TDSpoutOut")

    assert logic.poll() is None  # nobody sends yet
    touch = texture(2, 4)
    other.publish(touch, DXGI_R8G8B8A8)
    assert logic.poll() is None  # contact: the buffer is made at the sender's size
    pixels, pixel_format = logic.poll()
    assert pixel_format == "rgba" and np.array_equal(pixels, touch)
    assert receiver.calls[-1][2] == ((2, 4, 4), GL_RGBA)
    assert logic.poll() is None  # the same frame again is not new

    bigger = texture(3, 6)
    other.publish(bigger, DXGI_B8G8R8A8)
    assert logic.poll() is None  # resized: a new buffer before any copy
    pixels, pixel_format = logic.poll()
    assert pixel_format == "bgra" and np.array_equal(pixels, bigger)
    assert receiver.calls[-1][2] == ((3, 6, 4), GL_BGRA_EXT)
    assert receiver.calls[0] == ("setReceiverName", threading.get_ident(), ("TDSpoutOut",))


def test_source_makes_every_spout_call_on_its_own_thread_and_cleans_up():
    other = OtherApplication()
    receiver = StandInReceiver(other)
    other.publish(texture(6, 12), DXGI_R8G8B8A8)
    source = SpoutSource("TDSpoutOut", 8, 4, spoutgl=stand_in_spoutgl(receiver=receiver))
    with source:
        frame = source.read(timeout=5.0)
        assert source.connected
    assert frame.pixels.shape == (4, 8, 4) and frame.pixel_format == "rgba"
    (spout_thread,) = receiver.threads()
    assert spout_thread != threading.get_ident()
    names = receiver.names()
    assert names[0] == "createOpenGL" and names[-2:] == ["releaseReceiver", "closeOpenGL"]
    assert not source.connected


def test_source_without_an_opengl_context_fails_in_one_sentence():
    receiver = StandInReceiver(OtherApplication(), gl_works=False)
    source = SpoutSource("x", 8, 8, spoutgl=stand_in_spoutgl(receiver=receiver))
    with pytest.raises(TransportError, match="^Spout could not create its hidden OpenGL context;"):
        source.open()
    assert receiver.names()[-2:] == ["releaseReceiver", "closeOpenGL"]


def test_sink_sends_each_frame_at_its_size_in_its_format_from_one_thread():
    sender = StandInSender()
    sink = SpoutSink("sd-out", spoutgl=stand_in_spoutgl(sender=sender))
    with sink:
        sink.write(Frame(np.full((2, 4, 4), 7, np.uint8), "rgba", 0.0, 0))
        wait_until(lambda: sender.names().count("setFrameSync") == 1)
        sink.write(Frame(np.full((3, 6, 3), 9, np.uint8), "bgr", 0.0, 1))
        wait_until(lambda: sender.names().count("setFrameSync") == 2)
        assert sink.connected
    sends = [arguments for name, _, arguments in sender.calls if name == "sendImage"]
    assert sends == [(4, 2, GL_RGBA, b"\x07" * 4), (6, 3, GL_BGR_EXT, b"\x09" * 3)]
    assert ("setSenderName", ("sd-out",)) in [(n, a) for n, _, a in sender.calls]
    assert sender.names()[-2:] == ["releaseSender", "closeOpenGL"]
    assert len(sender.threads()) == 1 and threading.get_ident() not in sender.threads()


def test_senders_are_listed_with_their_sizes():
    receiver = SimpleNamespace(
        getSenderList=lambda: ["TDSpoutOut", "Resolume"],
        getSenderInfo=lambda name: SimpleNamespace(width=1280, height=720),
        releaseReceiver=lambda: None,
    )
    listed = list_senders(stand_in_spoutgl(receiver=receiver))
    assert listed == [("TDSpoutOut", 1280, 720), ("Resolume", 1280, 720)]


@pytest.mark.skipif(sys.platform == "win32", reason="checks the message given off Windows")
def test_spout_off_windows_says_it_is_windows_only_and_suggests_shm():
    expected = (
        "Spout is Windows-only; on this system use shm:<name> to exchange frames with "
        "TouchDesigner or OBS."
    )
    with pytest.raises(TransportError) as as_source:
        open_source("spout:TDSpoutOut", width=8, height=8)
    with pytest.raises(TransportError) as as_sink:
        open_sink("spout:sd-out", width=8, height=8)
    assert str(as_source.value) == str(as_sink.value) == expected
