"""syphon: logic checked against a stand-in of syphon-python's documented API; Syphon is not run.

Syphon needs macOS, Metal and another Syphon application, none of which these tests have. The
stand-in mirrors what syphon-python documents for the calls the bridge makes (its README, its
examples and the docstrings of `syphon.server`, `syphon.client`, `syphon.server_directory` and
`syphon.utils`): `SyphonServerDirectory().servers` lists descriptions with `name` and
`app_name`; a `SyphonMetalClient(description)` has `is_valid`, `has_new_frame` and
`new_frame_image` (an MTLTexture with `width()`, `height()` and `pixelFormat()`) and `stop()`;
`SyphonMetalServer(name)` has `device`, `publish_frame_texture(texture)`, `has_clients` and
`stop()`; `utils.raw.create_mtl_texture(device, width, height)` makes an RGBA8 texture and
`utils.numpy` copies (height, width, 4) arrays into and out of textures.

What is not covered: PyObjC, Metal, the Syphon framework, and a real application on the other
side. This transport is unverified until it runs on a Mac.
"""

from __future__ import annotations

import sys
from types import SimpleNamespace

import numpy as np
import pytest

from bridge.io import Frame, TransportError, open_sink, open_source
from bridge.io.syphon import SyphonSink, SyphonSource, list_servers, pixel_format_for_texture

RGBA8, BGRA8 = 70, 80  # MTLPixelFormatRGBA8Unorm, MTLPixelFormatBGRA8Unorm


class Texture:
    def __init__(self, pixels: np.ndarray, pixel_format: int = RGBA8):
        self.pixels, self.format = pixels, pixel_format

    def width(self):
        return self.pixels.shape[1]

    def height(self):
        return self.pixels.shape[0]

    def pixelFormat(self):
        return self.format


class OtherApplication:
    """The Syphon servers of other applications, and what each one shows."""

    def __init__(self):
        self.servers: list[SimpleNamespace] = []
        self.frames: dict[str, list[Texture]] = {}
        self.clients: list[StandInClient] = []

    def announce(self, name: str, app_name: str) -> SimpleNamespace:
        server = SimpleNamespace(uuid=f"id-{name}", name=name, app_name=app_name, raw={})
        self.servers.append(server)
        self.frames[server.uuid] = []
        return server

    def retire(self, server: SimpleNamespace) -> None:
        self.servers.remove(server)


class StandInClient:
    def __init__(self, other: OtherApplication, description):
        self.other, self.description, self.stopped = other, description, False
        other.clients.append(self)

    @property
    def is_valid(self):
        return self.description in self.other.servers

    @property
    def has_new_frame(self):
        return bool(self.other.frames[self.description.uuid])

    @property
    def new_frame_image(self):
        return self.other.frames[self.description.uuid].pop(0)

    def stop(self):
        self.stopped = True


class StandInServer:
    def __init__(self, name: str):
        self.name, self.device, self.published, self.stopped = name, "metal-device", [], False
        self.has_clients = False

    def publish_frame_texture(self, texture):
        self.published.append(texture.pixels.copy())

    def stop(self):
        self.stopped = True


def stand_in_syphon(other: OtherApplication, servers: list | None = None):
    def directory():
        return SimpleNamespace(servers=other.servers, run_loop_interval=1.0)

    def copy_image_to_mtl_texture(image, texture):
        assert image.shape == texture.pixels.shape, "syphon copies whole textures only"
        texture.pixels[...] = image

    def make_server(name):
        server = StandInServer(name)
        (servers if servers is not None else []).append(server)
        return server

    raw = SimpleNamespace(
        create_mtl_texture=lambda device, width, height: Texture(
            np.zeros((height, width, 4), np.uint8)
        )
    )
    numpy_utils = SimpleNamespace(
        copy_image_to_mtl_texture=copy_image_to_mtl_texture,
        copy_mtl_texture_to_image=lambda texture: texture.pixels.copy(),
    )
    return SimpleNamespace(
        SyphonServerDirectory=directory,
        SyphonMetalClient=lambda description: StandInClient(other, description),
        SyphonMetalServer=make_server,
        utils=SimpleNamespace(raw=raw, numpy=numpy_utils),
    )


def pixels(value: int, height: int = 4, width: int = 8) -> np.ndarray:
    out = np.full((height, width, 4), value, np.uint8)
    out[..., 0] = 200  # the first byte differs from the third, so a byte-order mix-up shows
    return out


def test_texture_formats_map_to_byte_orders():
    assert pixel_format_for_texture(RGBA8) == "rgba"
    assert pixel_format_for_texture(BGRA8) == "bgra"


def test_source_picks_a_server_by_name_then_by_application_and_reads_its_byte_order():
    other = OtherApplication()
    other.announce("", "Resolume")
    td = other.announce("sd-in", "TouchDesigner")
    other.frames[td.uuid].append(Texture(pixels(10), BGRA8))
    with SyphonSource("sd-in", 8, 4, syphon=stand_in_syphon(other)) as source:
        frame = source.read(timeout=1.0)
        assert source.connected and source.describe() == "syphon:sd-in"
        assert source.read(timeout=0.05) is None  # nothing new
    assert frame.pixel_format == "bgra" and np.array_equal(frame.pixels, pixels(10))
    assert [client.description for client in other.clients] == [td]
    assert other.clients[0].stopped

    other = OtherApplication()
    resolume = other.announce("", "Resolume")
    other.frames[resolume.uuid].append(Texture(pixels(20, 8, 16), RGBA8))
    with SyphonSource("Resolume", 8, 4, syphon=stand_in_syphon(other)) as source:
        frame = source.read(timeout=1.0)
    assert frame.pixel_format == "rgba" and frame.pixels.shape == (4, 8, 4)  # fitted


def test_source_waits_for_a_server_that_goes_and_comes_back():
    other = OtherApplication()
    first = other.announce("sd-in", "TouchDesigner")
    other.frames[first.uuid].append(Texture(pixels(1)))
    syphon = stand_in_syphon(other)
    with SyphonSource("sd-in", 8, 4, syphon=syphon) as source:
        assert source.read(timeout=1.0) is not None
        other.retire(first)
        assert source.read(timeout=0.1) is None
        assert not source.connected and "waiting" in source.describe()
        second = other.announce("sd-in", "TouchDesigner")
        other.frames[second.uuid].append(Texture(pixels(2)))
        frame = source.read(timeout=2.0)
    assert frame is not None and frame.pixels[0, 0, 1] == 2
    assert other.clients[0].stopped and other.clients[1].description is second


def test_sink_publishes_rgba_textures_that_follow_the_frame_size():
    servers: list[StandInServer] = []
    sink = SyphonSink("sd-out", syphon=stand_in_syphon(OtherApplication(), servers))
    with sink:
        sink.write(Frame(np.full((2, 4, 3), 9, np.uint8), "bgr", 0.0, 0))
        bgra = np.zeros((3, 6, 4), np.uint8)
        bgra[..., 0] = 50  # blue
        sink.write(Frame(bgra, "bgra", 0.0, 1))
    (server,) = servers
    assert server.name == "sd-out" and server.stopped
    first, second = server.published
    assert first.shape == (2, 4, 4) and (first[..., :3] == 9).all() and (first[..., 3] == 255).all()
    assert second.shape == (3, 6, 4) and (second[..., 2] == 50).all()  # blue is third in RGBA


def test_servers_are_listed_with_their_application():
    other = OtherApplication()
    other.announce("sd-in", "TouchDesigner")
    assert list_servers(stand_in_syphon(other)) == [("sd-in", "TouchDesigner")]


@pytest.mark.skipif(sys.platform == "darwin", reason="checks the message given off macOS")
def test_syphon_off_macos_says_it_is_macos_only_and_suggests_ndi_or_shm():
    with pytest.raises(TransportError) as as_source:
        open_source("syphon:sd-in", width=8, height=8)
    with pytest.raises(TransportError) as as_sink:
        open_sink("syphon:sd-out", width=8, height=8)
    assert str(as_source.value) == str(as_sink.value)
    assert str(as_sink.value).startswith("Syphon is macOS-only; on this system use ndi:<name>")
