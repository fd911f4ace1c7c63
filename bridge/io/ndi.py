"""`ndi:<name>`: video over the network with NDI, through ndi-python (it bundles the NDI runtime).

As a sink, the bridge publishes an NDI source called <name>; receivers list it as
"MACHINE (<name>)". Frames go out in their own byte order (RGBA, BGRA, or RGBX/BGRX where a frame
has no alpha), announced at the stream's frame rate and clocked by NDI, so receivers see an even
rate. Each frame's metadata carries its capture time (`capture_metadata`), so latency can be
measured at the far end.

As a source, `ndi:<name>` looks a sender up by its full name ("MACHINE (stream)") or by the part
in brackets alone, through NDI discovery (mDNS) and by asking the hosts in `extra_ips` directly;
this machine is always asked, so local senders are found where mDNS is blocked (a host answers
on port 5960 for one NDI process only, so with several sending processes mDNS or `url` is needed).
`ndi:<name>?url=<host>:<port>` skips the look-up and connects to that address. Whatever the
sender sends (BGRA, BGRX, UYVY, RGBA), the NDI runtime decodes it on the CPU to RGBX or RGBA,
which become "rgb" or "rgba" frames; `bandwidth` set to "lowest" receives the sender's
low-resolution preview stream instead of the full one.

When a source has had no connection for RECONNECT_AFTER seconds it connects again: by name after
a fresh look-up (a restarted sender usually listens on another port), by address to the same
address. Meanwhile `read` returns None and the engine's input-loss policy applies.
"""

from __future__ import annotations

import logging
import re
import socket
import threading
import time
from fractions import Fraction
from types import ModuleType
from typing import Any
from xml.sax.saxutils import quoteattr

import numpy as np

from bridge.io.base import Sink, Source, TransportError
from bridge.io.frame import Frame, now

log = logging.getLogger("bridge.io.ndi")

BANDWIDTHS = ("highest", "lowest")
LOCAL_HOST = "127.0.0.1"
# Seconds without a connection before a source connects again.
RECONNECT_AFTER = 1.0
# A look-up makes a fresh finder when its finder is older than this: NDI asks the extra hosts
# only when a finder starts, while mDNS answers need a moment to gather.
FINDER_REFRESH = 2.0
# Seconds after opening at which a source not found yet is reported, once.
NOT_FOUND_AFTER = 5.0
# Capture times further in the past than this are taken for clocks that disagree.
MAX_AGE = 2.0
# Longest single wait on the NDI library, so a source notices loss and close() is never held up.
CAPTURE_SLICE = 0.1
RECEIVER_NAME = "sd-bridge"

_module: ModuleType | None = None
_module_lock = threading.Lock()


def load_ndi() -> ModuleType:
    """The NDIlib module with the NDI runtime started, or TransportError saying why not."""
    global _module
    with _module_lock:
        if _module is None:
            try:
                import NDIlib
            except ImportError as error:
                raise TransportError(
                    "NDI needs ndi-python, which is not installed; run "
                    "pip install streamdiffusion-bridge[ndi]."
                ) from error
            if not NDIlib.initialize():
                reason = (
                    "this CPU is not one NDI supports"
                    if not NDIlib.is_supported_CPU()
                    else "reinstall ndi-python"
                )
                raise TransportError(f"The NDI runtime did not start; {reason}.")
            _module = NDIlib
        return _module


def runtime_version() -> str:
    """The version of the NDI runtime that loaded, or TransportError saying why none did."""
    return str(load_ndi().version())


def stream_name(full_name: str) -> str:
    """The part of an NDI name in brackets: "VJ-PC (TouchDesigner)" gives "TouchDesigner"."""
    match = re.fullmatch(r"[^(]*? \((.*)\)", full_name)
    return match.group(1) if match else full_name


def pick_source(wanted: str, found: list[tuple[str, str]]) -> tuple[str, str] | None:
    """The (name, url) among `found` that `wanted` names, by full name or by stream name alone."""
    for name, url in found:
        if name == wanted:
            return name, url
    matches = [(name, url) for name, url in found if stream_name(name) == wanted]
    if len(matches) > 1:
        names = " and ".join(repr(name) for name, _ in matches)
        raise TransportError(
            f"The NDI name {wanted!r} matches {names}; give the full name, e.g. "
            f"ndi:{matches[0][0]}."
        )
    return matches[0] if matches else None


def parse_url(url: str) -> str:
    """Check that `url` is host:port and return it; ValueError otherwise."""
    host, _, port = url.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"url={url!r} must be host:port, e.g. url=192.168.1.20:5961.")
    return url


def capture_metadata(capture_time: float, index: int, host: str | None = None) -> str:
    """The XML that an outgoing frame carries: its capture time on two clocks, host and index.

    `capture_time` is on the `now()` clock, which every process of one machine shares;
    `wall_time` is the same moment in Unix seconds, for receivers on other machines.
    """
    wall = time.time() - (now() - capture_time)
    host_attribute = quoteattr(host or socket.gethostname())
    return (
        f'<sd_bridge capture_time="{capture_time:.6f}" wall_time="{wall:.6f}" '
        f'host={host_attribute} index="{index}"/>'
    )


def parse_capture_metadata(metadata: str | None) -> dict[str, str]:
    """The attributes of `capture_metadata` XML; empty for anything else."""
    if not metadata:
        return {}
    match = re.fullmatch(r"\s*<sd_bridge\s([^<>]*)/>\s*", metadata)
    if match is None:
        return {}
    return dict(re.findall(r'(\w+)="([^"<>]*)"', match.group(1)))


def capture_time_of(
    metadata: str | None,
    timestamp: int | None,
    *,
    received: float,
    wall_received: float,
    host: str,
) -> float:
    """When a received frame was captured, on this machine's `now()` clock.

    A frame from a bridge on this machine carries the exact time. Otherwise a wall-clock time
    (the bridge's, or NDI's own send timestamp in 100 ns units) is used when the two machines'
    clocks agree well enough to give an age between 0 and MAX_AGE; else the time of receipt.
    """
    fields = parse_capture_metadata(metadata)
    try:
        if fields.get("host") == host and "capture_time" in fields:
            capture = float(fields["capture_time"])
            if received - MAX_AGE <= capture <= received:
                return capture
        if "wall_time" in fields:
            wall = float(fields["wall_time"])
        elif timestamp and 0 < timestamp < 2**62:
            wall = timestamp * 1e-7
        else:
            return received
    except ValueError:
        return received
    age = wall_received - wall
    return received - age if 0 <= age <= MAX_AGE else received


class NdiSink(Sink):
    """Publishes frames as an NDI source named `name`, announced at `fps`."""

    def __init__(self, name: str, *, fps: float = 30.0):
        super().__init__()
        if not name:
            raise ValueError("An NDI sink needs a source name, e.g. ndi:sd-bridge.")
        self.name = name
        rate = Fraction(fps).limit_denominator(1001)
        self._rate = (rate.numerator, rate.denominator)
        self._ndi: Any = None
        self._sender: Any = None
        self._lock = threading.Lock()
        self._host = socket.gethostname()

    @property
    def connected(self) -> bool:
        """Whether at least one receiver is connected."""
        with self._lock:
            if self._sender is None:
                return False
            return self._ndi.send_get_no_connections(self._sender, 0) > 0

    def describe(self) -> str:
        return f"ndi:{self.name}"

    def _open(self) -> None:
        ndi = load_ndi()
        sender = ndi.send_create(ndi.SendCreate(self.name, clock_video=True, clock_audio=False))
        if sender is None:
            raise TransportError(
                f"NDI could not publish a source named {self.name!r}; check that the network "
                "is up, or pick another name."
            )
        self._ndi, self._sender = ndi, sender

    def _close(self) -> None:
        with self._lock:
            sender, self._sender = self._sender, None
            if sender is not None:
                self._ndi.send_destroy(sender)

    def _write(self, frame: Frame) -> None:
        ndi = self._ndi
        if frame.pixel_format in ("rgb", "bgr"):
            frame = frame.to(frame.pixel_format + "a")  # opaque alpha, sent as X
            four_cc = {"rgba": ndi.FOURCC_VIDEO_TYPE_RGBX, "bgra": ndi.FOURCC_VIDEO_TYPE_BGRX}
        else:
            four_cc = {"rgba": ndi.FOURCC_VIDEO_TYPE_RGBA, "bgra": ndi.FOURCC_VIDEO_TYPE_BGRA}
        video = ndi.VideoFrameV2()
        video.data = frame.pixels
        video.FourCC = four_cc[frame.pixel_format]
        video.frame_rate_N, video.frame_rate_D = self._rate
        video.timecode = ndi.SEND_TIMECODE_SYNTHESIZE
        video.metadata = capture_metadata(frame.capture_time, frame.index, self._host)
        with self._lock:
            if self._sender is not None:
                # Synchronous: NDI is done with the pixels when this returns; with clock_video
                # it also waits for the frame's turn, which paces this sink's thread.
                ndi.send_send_video_v2(self._sender, video)


class NdiSource(Source):
    """Receives an NDI sender's video, found by name or at `url`, fitted to width x height."""

    def __init__(
        self,
        name: str,
        width: int,
        height: int,
        *,
        url: str | None = None,
        bandwidth: str = "highest",
        extra_ips: tuple[str, ...] = (),
    ):
        """`extra_ips` are hosts asked directly for their senders, besides this one."""
        super().__init__()
        if not name and not url:
            raise ValueError(
                "An NDI source needs a sender name, e.g. ndi:TouchDesigner, or an address, "
                "e.g. ndi:td?url=192.168.1.20:5961."
            )
        if bandwidth not in BANDWIDTHS:
            raise ValueError(
                f"bandwidth={bandwidth!r} is unknown; use highest, or lowest for the sender's "
                "low-resolution preview."
            )
        self.name = name
        self.width = width
        self.height = height
        self.url = parse_url(url) if url else None
        self.bandwidth = bandwidth
        self.extra_ips = tuple(dict.fromkeys((LOCAL_HOST, *extra_ips)))
        self._ndi: Any = None
        self._lock = threading.Lock()
        self._receiver: Any = None
        self._finder: Any = None
        self._finder_born = 0.0
        self._address: tuple[str, str] | None = None
        self._seen: list[str] = []
        self._connections = 0
        self._last_connected = 0.0
        self._opened_at = 0.0
        self._reported_missing = False
        self._index = 0
        self._host = socket.gethostname()
        self.received_size: tuple[int, int] | None = None  # of the last frame, before fitting

    @property
    def connected(self) -> bool:
        return self._connections > 0

    def describe(self) -> str:
        where = f"ndi:{self.name}" + (f"?url={self.url}" if self.url else "")
        if self.connected:
            size = "x".join(map(str, self.received_size)) if self.received_size else "no frame"
            return f"{where} (connected to {self._address[0]}, {size})"
        if self.url:
            return f"{where} (waiting for the sender at {self.url})"
        seen = ", ".join(self._seen) if self._seen else "none"
        return f"{where} (waiting for an NDI sender named {self.name!r}; senders seen: {seen})"

    def _open(self) -> None:
        self._ndi = load_ndi()
        self._opened_at = self._last_connected = now()
        self._reported_missing = False
        if self.url:
            self._connect((self.name or self.url, self.url))

    def _close(self) -> None:
        with self._lock:
            self._drop_receiver()
            if self._finder is not None:
                self._ndi.find_destroy(self._finder)
                self._finder = None
            self._address = None

    def _read(self, timeout: float) -> Frame | None:
        deadline = now() + timeout
        while self.is_open:
            # One slice at a time under the lock, so close() waits for one slice at most.
            with self._lock:
                if not self.is_open:
                    return None
                remaining = max(deadline - now(), 0.0)
                if self._receiver is None or now() - self._last_connected > RECONNECT_AFTER:
                    self._reconnect(min(remaining, CAPTURE_SLICE))
                    remaining = max(deadline - now(), 0.0)
                frame = None
                if self._receiver is not None:
                    frame = self._capture(min(remaining, CAPTURE_SLICE))
            if frame is not None:
                return frame.fitted(self.width, self.height)
            if self._receiver is None and remaining > 0:
                time.sleep(min(remaining, CAPTURE_SLICE))
            if now() >= deadline:
                return None
        return None

    def _capture(self, wait: float) -> Frame | None:
        ndi = self._ndi
        kind, video, _, _ = ndi.recv_capture_v2(
            self._receiver, int(wait * 1000), want_audio=False, want_metadata=False
        )
        received, wall_received = now(), time.time()
        self._connections = ndi.recv_get_no_connections(self._receiver)
        if self._connections:
            self._last_connected = received
        if kind != ndi.FRAME_TYPE_VIDEO or video is None:
            return None
        try:
            got = _pixels_of(ndi, video)
            metadata, timestamp = video.metadata, video.timestamp
        finally:
            ndi.recv_free_video_v2(self._receiver, video)
        if got is None:
            return None
        pixels, pixel_format = got
        self.received_size = (pixels.shape[1], pixels.shape[0])
        capture = capture_time_of(
            metadata, timestamp, received=received, wall_received=wall_received, host=self._host
        )
        frame = Frame(pixels, pixel_format, capture, self._index)
        self._index += 1
        return frame

    def _reconnect(self, wait: float) -> None:
        """Connect again: to the same address, or to where a fresh look-up finds the name."""
        self._connections = 0
        if self.url:
            self._connect(self._address)
            return
        self._drop_receiver()
        self._address = None
        found = self._look_up(wait)
        if found is not None:
            self._connect(found)
        elif not self._reported_missing and now() - self._opened_at > NOT_FOUND_AFTER:
            self._reported_missing = True
            seen = ", ".join(self._seen) if self._seen else "none"
            log.warning(
                "No NDI sender named %r was found in %g s (senders seen: %s); check the name, "
                "or connect directly with ndi:%s?url=<host>:<port>.",
                self.name,
                NOT_FOUND_AFTER,
                seen,
                self.name,
            )

    def _look_up(self, wait: float) -> tuple[str, str] | None:
        ndi = self._ndi
        if self._finder is None or now() - self._finder_born > FINDER_REFRESH:
            if self._finder is not None:
                ndi.find_destroy(self._finder)
            self._finder = _make_finder(ndi, self.extra_ips)
            self._finder_born = now()
        ndi.find_wait_for_sources(self._finder, int(wait * 1000))
        found = [(s.ndi_name, s.url_address) for s in ndi.find_get_current_sources(self._finder)]
        self._seen = [name for name, _ in found]
        return pick_source(self.name, found)

    def _connect(self, address: tuple[str, str]) -> None:
        ndi = self._ndi
        self._drop_receiver()
        settings = ndi.RecvCreateV3(
            ndi.Source(*address),
            color_format=ndi.RECV_COLOR_FORMAT_RGBX_RGBA,
            bandwidth=(
                ndi.RECV_BANDWIDTH_LOWEST
                if self.bandwidth == "lowest"
                else ndi.RECV_BANDWIDTH_HIGHEST
            ),
            allow_video_fields=False,
            p_ndi_recv_name=RECEIVER_NAME,
        )
        receiver = ndi.recv_create_v3(settings)
        if receiver is None:
            raise TransportError(f"NDI could not make a receiver for {address[0]!r}.")
        self._receiver, self._address = receiver, address
        self._last_connected = now()  # give the connection RECONNECT_AFTER to come up

    def _drop_receiver(self) -> None:
        if self._receiver is not None:
            self._ndi.recv_destroy(self._receiver)
            self._receiver = None
        self._connections = 0


def _pixels_of(ndi: ModuleType, video: Any) -> tuple[np.ndarray, str] | None:
    """A copy of a received frame's pixels and their format; None for a format not asked for."""
    formats = {
        ndi.FOURCC_VIDEO_TYPE_RGBA: "rgba",
        ndi.FOURCC_VIDEO_TYPE_RGBX: "rgb",
        ndi.FOURCC_VIDEO_TYPE_BGRA: "bgra",
        ndi.FOURCC_VIDEO_TYPE_BGRX: "bgr",
    }
    pixel_format = formats.get(video.FourCC)
    if pixel_format is None or video.line_stride_in_bytes != video.xres * 4:
        return None
    data = video.data
    return np.array(data[:, :, : len(pixel_format)], order="C"), pixel_format  # a copy


def _make_finder(ndi: ModuleType, extra_ips: tuple[str, ...]) -> Any:
    finder = ndi.find_create_v2(ndi.FindCreate(True, None, ",".join(extra_ips) or None))
    if finder is None:
        raise TransportError("NDI could not start looking for senders; check the network.")
    return finder


def list_sources(wait: float = 1.0, extra_ips: tuple[str, ...] = ()) -> list[tuple[str, str]]:
    """Full name and address of every NDI sender found within `wait` seconds.

    Discovery gathers mDNS answers for the whole wait; this machine and `extra_ips` are asked
    directly.
    """
    ndi = load_ndi()
    finder = _make_finder(ndi, tuple(dict.fromkeys((LOCAL_HOST, *extra_ips))))
    try:
        deadline = now() + wait
        while (remaining := deadline - now()) > 0:
            ndi.find_wait_for_sources(finder, max(int(remaining * 1000), 1))
        return sorted((s.ndi_name, s.url_address) for s in ndi.find_get_current_sources(finder))
    finally:
        ndi.find_destroy(finder)
