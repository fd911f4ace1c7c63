"""`syphon:<server>`: GPU texture sharing on macOS through syphon-python (Metal). Unverified.

Written against syphon-python's documented API (`SyphonServerDirectory`, `SyphonMetalClient`,
`SyphonMetalServer` and the helpers in `syphon.utils.numpy` and `syphon.utils.raw`) and checked
against a stand-in of it; it has not run on a Mac with another Syphon application.

A server is chosen by its name, else by its application's name (TouchDesigner's Syphon Out TOP
names its server; some applications publish one unnamed server); an empty name (`syphon:`) takes
the first server there is. A client's texture is BGRA (Syphon's Metal format) or RGBA; frames
carry the texture's own byte order. When the server goes away, the source waits for it to come
back under the same name, and `read` returns None meanwhile.
"""

from __future__ import annotations

import sys
import time
from types import ModuleType
from typing import Any

from bridge.io.base import Sink, Source, TransportError
from bridge.io.frame import Frame, now

# Seconds between two looks at a client or at the server directory when nothing is new.
POLL_INTERVAL = 0.002
LOOKUP_INTERVAL = 0.5
# Seconds the directory runs the macOS run loop to hear of servers; syphon-python's default is 1.
RUN_LOOP_INTERVAL = 0.01
# Metal's MTLPixelFormatRGBA8Unorm and its sRGB variant; every other texture is read as BGRA.
_RGBA_TEXTURES = frozenset({70, 71})


def pixel_format_for_texture(metal_pixel_format: int) -> str:
    """Byte order of a Metal texture, from its `pixelFormat()`."""
    return "rgba" if metal_pixel_format in _RGBA_TEXTURES else "bgra"


def load_syphon() -> ModuleType:
    """The syphon module with its numpy and raw helpers, or TransportError saying why not."""
    if sys.platform != "darwin":
        raise TransportError(
            "Syphon is macOS-only; on this system use ndi:<name> or shm:<name> to exchange "
            "frames with other applications."
        )
    try:
        import syphon
        import syphon.utils.numpy
        import syphon.utils.raw
    except ImportError as error:
        raise TransportError(
            "Syphon needs syphon-python, which is not installed; run "
            "pip install streamdiffusion-bridge[syphon]."
        ) from error
    return syphon


def pick_server(wanted: str, servers: list[Any]) -> Any | None:
    """The server description `wanted` names: by name, else by application name."""
    if not wanted:
        return servers[0] if servers else None
    for key in ("name", "app_name"):
        for server in servers:
            if getattr(server, key) == wanted:
                return server
    return None


class SyphonSource(Source):
    """Receives a Syphon server's frames through a Metal client, fitted to width x height."""

    def __init__(self, name: str, width: int, height: int, *, syphon: ModuleType | None = None):
        """`syphon` replaces the imported syphon module, for tests where Syphon cannot run."""
        super().__init__()
        self.name = name
        self.width = width
        self.height = height
        self._module = syphon
        self._syphon: Any = None
        self._directory: Any = None
        self._client: Any = None
        self._next_lookup = 0.0
        self._index = 0

    @property
    def connected(self) -> bool:
        return self._client is not None

    def describe(self) -> str:
        name = f"syphon:{self.name or '(first server)'}"
        return name if self.connected else f"{name} (waiting for the server)"

    def _open(self) -> None:
        self._syphon = self._module or load_syphon()
        self._directory = self._syphon.SyphonServerDirectory()
        self._directory.run_loop_interval = RUN_LOOP_INTERVAL
        self._next_lookup = 0.0

    def _close(self) -> None:
        self._drop_client()
        self._directory = None

    def _read(self, timeout: float) -> Frame | None:
        deadline = now() + timeout
        while True:
            if self._client is not None and not self._client.is_valid:
                self._drop_client()  # the server went away
            if self._client is None and now() >= self._next_lookup:
                self._next_lookup = now() + LOOKUP_INTERVAL
                server = pick_server(self.name, self._directory.servers)
                if server is not None:
                    self._client = self._syphon.SyphonMetalClient(server)
            if self._client is not None and self._client.has_new_frame:
                texture = self._client.new_frame_image
                pixels = self._syphon.utils.numpy.copy_mtl_texture_to_image(texture)
                pixel_format = pixel_format_for_texture(int(texture.pixelFormat()))
                frame = Frame(pixels, pixel_format, now(), self._index)
                self._index += 1
                return frame.fitted(self.width, self.height)
            if now() >= deadline:
                return None
            time.sleep(POLL_INTERVAL)

    def _drop_client(self) -> None:
        if self._client is not None:
            self._client.stop()
            self._client = None


class SyphonSink(Sink):
    """Publishes frames as a Syphon server through Metal; the texture follows the frame size."""

    def __init__(self, name: str, *, syphon: ModuleType | None = None):
        """`syphon` replaces the imported syphon module, for tests where Syphon cannot run."""
        super().__init__()
        if not name:
            raise ValueError("A Syphon sink needs a server name, e.g. syphon:sd-bridge.")
        self.name = name
        self._module = syphon
        self._syphon: Any = None
        self._server: Any = None
        self._texture: Any = None
        self._size = (0, 0)

    @property
    def connected(self) -> bool:
        return self._server is not None and bool(self._server.has_clients)

    def describe(self) -> str:
        return f"syphon:{self.name}"

    def _open(self) -> None:
        self._syphon = self._module or load_syphon()
        self._server = self._syphon.SyphonMetalServer(self.name)

    def _close(self) -> None:
        if self._server is not None:
            self._server.stop()
        self._server = self._texture = None
        self._size = (0, 0)

    def _write(self, frame: Frame) -> None:
        # create_mtl_texture makes RGBA8 textures, so every frame goes out as RGBA.
        frame = frame.to("rgba")
        if self._size != (frame.width, frame.height):
            self._texture = self._syphon.utils.raw.create_mtl_texture(
                self._server.device, frame.width, frame.height
            )
            self._size = (frame.width, frame.height)
        self._syphon.utils.numpy.copy_image_to_mtl_texture(frame.pixels, self._texture)
        self._server.publish_frame_texture(self._texture)


def list_servers(syphon: ModuleType | None = None) -> list[tuple[str, str]]:
    """Name and application name of every Syphon server running now."""
    module = syphon or load_syphon()
    directory = module.SyphonServerDirectory()
    directory.run_loop_interval = RUN_LOOP_INTERVAL
    return [(str(server.name), str(server.app_name)) for server in directory.servers]
