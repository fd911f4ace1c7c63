"""Choosing a transport by URI, and telling which transports and devices this machine has.

A URI is `scheme:target`, optionally followed by `?key=value&key=value` options:

    spout:TouchDesigner       cam:0    cam:/dev/video2    vcam    vcam:/dev/video10
    shm:td-in    file:clip.mp4?fps=24    file:out_%05d.png    pattern:bars?fps=60    null
    ndi:TouchDesigner    ndi:td?url=192.168.1.20:5961&bandwidth=lowest    syphon:sd-out
"""

from __future__ import annotations

import importlib.util
import sys
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qsl

from bridge.io.base import Sink, Source, TransportError
from bridge.io.camera import CameraSource, parse_device, probe_cameras
from bridge.io.file import open_file_sink, open_file_source
from bridge.io.ndi import NdiSink, NdiSource, list_sources, stream_name
from bridge.io.null import NullSink
from bridge.io.pattern import PatternSource
from bridge.io.shm import ShmSink, ShmSource, list_streams
from bridge.io.shm_protocol import STALE_AFTER, clock
from bridge.io.spout import SpoutSink, SpoutSource, list_senders
from bridge.io.syphon import SyphonSink, SyphonSource, list_servers
from bridge.io.vcam import VirtualCameraSink


@dataclass(frozen=True)
class _Scheme:
    usage: str
    source_options: frozenset[str] | None  # None: not a source
    sink_options: frozenset[str] | None  # None: not a sink


_SCHEMES: dict[str, _Scheme] = {
    "spout": _Scheme("spout:<sender name>", frozenset(), frozenset()),
    "cam": _Scheme("cam:<index or device path>", frozenset(), None),
    "vcam": _Scheme("vcam[:<device>][?fps=30]", None, frozenset({"fps"})),
    "shm": _Scheme("shm:<name>", frozenset(), frozenset()),
    "file": _Scheme(
        "file:<path>[?fps=30][&codec=libx264]", frozenset({"fps"}), frozenset({"fps", "codec"})
    ),
    "pattern": _Scheme("pattern:<bars|gradient|noise|checker>[?fps=30]", frozenset({"fps"}), None),
    "null": _Scheme("null", None, frozenset()),
    "ndi": _Scheme(
        "ndi:<name>[?url=<host>:<port>][&bandwidth=lowest][&ips=<host>,<host>]",
        frozenset({"url", "bandwidth", "ips"}),
        frozenset({"fps"}),
    ),
    "syphon": _Scheme("syphon:<server name>", frozenset(), frozenset()),
}
SCHEMES: tuple[str, ...] = tuple(_SCHEMES)


@dataclass(frozen=True)
class TransportUri:
    """A URI split into scheme, target and options, e.g. `file:a.mp4?fps=24`."""

    scheme: str
    target: str
    options: dict[str, str]

    def fps(self, default: float | None) -> float | None:
        """The `fps` option as a positive number, or `default` when absent."""
        if "fps" not in self.options:
            return default
        text = self.options["fps"]
        try:
            value = float(text)
        except ValueError:
            value = 0.0
        if not value > 0:
            raise ValueError(f"Option fps={text!r} must be a positive number, e.g. fps=30.")
        return value


def parse_uri(uri: str, role: str | None = None) -> TransportUri:
    """Split a transport URI; an unknown scheme raises ValueError naming the known ones.

    With `role` ("source" or "sink") the message names only the schemes that can play it.
    """
    scheme, _, target = uri.strip().partition(":")
    scheme = scheme.lower()
    if scheme not in _SCHEMES:
        known = SCHEMES if role is None else _schemes_for(role)
        what = "transport" if role is None else role
        raise ValueError(f"Unknown {what} {scheme!r} in {uri!r}; {what}s are {', '.join(known)}.")
    options: dict[str, str] = {}
    if "?" in target:
        target, _, query = target.rpartition("?")
        try:
            options = dict(parse_qsl(query, keep_blank_values=True, strict_parsing=True))
        except ValueError:
            raise ValueError(
                f"Options {query!r} in {uri!r} are not key=value pairs joined by &."
            ) from None
    if target.startswith("//"):  # file:///tmp/a.mp4 and file://C:/a.mp4 spellings
        target = target[2:]
    return TransportUri(scheme, target, options)


def open_source(uri: str, *, width: int, height: int, fps: float | None = None) -> Source:
    """Open the source a URI names; its frames are fitted to width x height.

    `fps` paces patterns and files unless the URI says `?fps=`; files default to their own rate.
    """
    parsed = _parse_for(uri, "source")
    scheme, target = parsed.scheme, parsed.target
    source: Source
    if scheme == "pattern":
        source = PatternSource(target or "bars", width, height, fps=parsed.fps(fps) or 30.0)
    elif scheme == "file":
        source = open_file_source(
            _require_target(parsed, "a path", "file:clip.mp4"), width, height, fps=parsed.fps(fps)
        )
    elif scheme == "cam":
        source = CameraSource(parse_device(target), width, height)
    elif scheme == "shm":
        source = ShmSource(_require_target(parsed, "a name", "shm:td-out"), width, height)
    elif scheme == "ndi":
        options = parsed.options
        source = NdiSource(
            target,
            width,
            height,
            url=options.get("url"),
            bandwidth=options.get("bandwidth", "highest"),
            extra_ips=tuple(ip for ip in options.get("ips", "").split(",") if ip),
        )
    elif scheme == "syphon":
        source = SyphonSource(target, width, height)
    else:
        source = SpoutSource(target, width, height)
    source.open()
    return source


def open_sink(uri: str, *, width: int, height: int, fps: float = 30.0) -> Sink:
    """Open the sink a URI names, sized width x height (see each sink for other frame sizes).

    `fps` is the frame rate written into video files and announced by virtual cameras, unless
    the URI says `?fps=`.
    """
    parsed = _parse_for(uri, "sink")
    scheme, target = parsed.scheme, parsed.target
    sink: Sink
    if scheme == "null":
        if target:
            raise ValueError(f"null takes nothing after it; write null instead of {uri!r}.")
        sink = NullSink()
    elif scheme == "file":
        sink = open_file_sink(
            _require_target(parsed, "a path", "file:out.mp4"),
            width,
            height,
            fps=parsed.fps(fps),
            codec=parsed.options.get("codec"),
        )
    elif scheme == "vcam":
        sink = VirtualCameraSink(width, height, device=target or None, fps=parsed.fps(fps))
    elif scheme == "shm":
        sink = ShmSink(_require_target(parsed, "a name", "shm:sd-out"), width, height)
    elif scheme == "ndi":
        sink = NdiSink(_require_target(parsed, "a name", "ndi:sd-bridge"), fps=parsed.fps(fps))
    elif scheme == "syphon":
        sink = SyphonSink(_require_target(parsed, "a server name", "syphon:sd-bridge"))
    else:
        sink = SpoutSink(_require_target(parsed, "a sender name", "spout:sd-bridge"))
    sink.open()
    return sink


def _schemes_for(role: str) -> list[str]:
    return [
        name
        for name, s in _SCHEMES.items()
        if (s.source_options if role == "source" else s.sink_options) is not None
    ]


def check_uri(uri: str, role: str) -> TransportUri:
    """Parse `uri` as a source or sink without opening it; ValueError says what is wrong."""
    return _parse_for(uri, role)


def _parse_for(uri: str, role: str) -> TransportUri:
    parsed = parse_uri(uri, role)
    scheme = _SCHEMES[parsed.scheme]
    allowed = scheme.source_options if role == "source" else scheme.sink_options
    if allowed is None:
        fitting = _schemes_for(role)
        raise ValueError(f"{parsed.scheme!r} cannot be a {role}; {role}s are {', '.join(fitting)}.")
    unknown = sorted(set(parsed.options) - allowed)
    if unknown:
        takes = f"it takes {', '.join(sorted(allowed))}" if allowed else "it takes none"
        raise ValueError(
            f"Option {unknown[0]!r} is not understood by {parsed.scheme}: as a {role}; {takes}."
        )
    return parsed


def _require_target(parsed: TransportUri, what: str, example: str) -> str:
    if not parsed.target:
        raise ValueError(f"{parsed.scheme}: needs {what}, e.g. {example}.")
    return parsed.target


@dataclass(frozen=True)
class TransportInfo:
    """What `sd-bridge list` says about one transport on this machine."""

    name: str
    usage: str
    source: bool
    sink: bool
    usable: bool
    reason: str  # why it is not usable, or which part of it is missing; empty when all is there


def available_transports() -> list[TransportInfo]:
    """Every transport, whether it works on this machine, and why not. Imports nothing heavy."""
    on_windows = sys.platform == "win32"
    on_linux = sys.platform.startswith("linux")
    checks: dict[str, tuple[bool, str]] = {
        "spout": _check(
            (on_windows, "Spout is Windows-only; use shm: instead"),
            (_installed("SpoutGL"), "needs pip install streamdiffusion-bridge[spout]"),
        ),
        "cam": _check((_installed("cv2"), "needs pip install streamdiffusion-bridge[camera]")),
        "vcam": _check(
            (_installed("pyvirtualcam"), "needs pip install streamdiffusion-bridge[vcam]"),
            (
                not on_linux or Path("/sys/module/v4l2loopback").exists(),
                "needs the v4l2loopback kernel module (sudo modprobe v4l2loopback)",
            ),
        ),
        "shm": (True, ""),
        "file": (
            True,
            ""
            if _installed("av")
            else "images only: video needs pip install streamdiffusion-bridge[video]",
        ),
        "pattern": (True, ""),
        "null": (True, ""),
        "ndi": _check((_installed("NDIlib"), "needs pip install streamdiffusion-bridge[ndi]")),
        "syphon": _check(
            (sys.platform == "darwin", "Syphon is macOS-only; use ndi: or shm: instead"),
            (_installed("syphon"), "needs pip install streamdiffusion-bridge[syphon]"),
        ),
    }
    return [
        TransportInfo(
            name,
            scheme.usage,
            scheme.source_options is not None,
            scheme.sink_options is not None,
            *checks[name],
        )
        for name, scheme in _SCHEMES.items()
    ]


@dataclass(frozen=True)
class Device:
    """Something a transport can connect to right now, with the URI that selects it."""

    uri: str
    kind: str
    description: str


def enumerate_devices(*, max_cameras: int = 4, ndi_wait: float = 1.0) -> list[Device]:
    """Spout senders, cameras (probing at most `max_cameras`), shared-memory streams, NDI
    senders (found within `ndi_wait` seconds) and Syphon servers."""
    devices = []
    if sys.platform == "win32" and _installed("SpoutGL"):
        for name, width, height in list_senders():
            devices.append(Device(f"spout:{name}", "spout sender", f"{width}x{height}"))
    if _installed("cv2"):
        for camera in probe_cameras(max_cameras):
            devices.append(Device(f"cam:{camera}", "camera", _camera_name(camera)))
    for name, header in list_streams():
        size = (
            f"{header.width}x{header.height} {header.pixel_format}"
            if header.generation
            else "no frame yet"
        )
        alive = not header.closed and abs(clock() - header.heartbeat) <= STALE_AFTER
        state = f"writer pid {header.writer_pid}" if alive else "left by a writer that stopped"
        devices.append(Device(f"shm:{name}", "shm stream", f"{size}, {state}"))
    if _installed("NDIlib"):
        try:
            for name, url in list_sources(ndi_wait):
                devices.append(Device(f"ndi:{stream_name(name)}", "ndi sender", f"{name} at {url}"))
        except TransportError:  # the runtime did not load: `sd-bridge doctor` says why
            pass
    if sys.platform == "darwin" and _installed("syphon"):
        for name, app_name in list_servers():
            devices.append(Device(f"syphon:{name or app_name}", "syphon server", app_name))
    return devices


def _camera_name(camera: int | str) -> str:
    """The driver's name for a Linux video device, else a plain label."""
    if isinstance(camera, str):
        name_file = Path("/sys/class/video4linux") / Path(camera).name / "name"
        if name_file.is_file():
            return name_file.read_text(encoding="utf-8", errors="replace").strip()
    return f"camera {camera}"


def _check(*conditions: tuple[bool, str]) -> tuple[bool, str]:
    for ok, reason in conditions:
        if not ok:
            return False, reason
    return True, ""


def _installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None
