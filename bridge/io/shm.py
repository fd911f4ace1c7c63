"""`shm:<name>`: frames through the shared-memory frame protocol (see docs/shm-protocol.md)."""

from __future__ import annotations

import sys
import time
from pathlib import Path

from bridge.io.base import Sink, Source, TransportError
from bridge.io.frame import Frame, now
from bridge.io.shm_protocol import (
    INDEX_SEGMENT_SIZE,
    STALE_AFTER,
    Header,
    ShmError,
    ShmReader,
    ShmWriter,
    parse_header,
    validate_name,
)

# The protocol has no signal a reader could sleep on, so a reader looks at the segment again
# and again. A look costs about 10 us, but each sleep between looks delays a new frame by half
# of it on average. A writer that is paced (a camera, a TouchDesigner timeline) publishes on a
# steady period, so the reader learns that period and sleeps POLL_INTERVAL while no frame is
# due, then looks every DUE_POLL_INTERVAL from DUE_EARLY before the next frame is due until it
# comes (or a period late, when it goes back to POLL_INTERVAL): a frame is picked up within a
# tenth of a millisecond, for a few percent of one core at 60 fps, where polling that often
# all the time would keep a core busy with looks that find nothing.
POLL_INTERVAL = 0.001
DUE_POLL_INTERVAL = 0.0001
DUE_EARLY = 0.002
# A gap longer than this is a writer that paused or restarted, not its period.
MAX_PERIOD = 1.0
# How fast the learnt period follows the intervals between frames.
PERIOD_SMOOTHING = 0.1


class ShmSource(Source):
    """Reads frames a TouchDesigner, OBS or other process publishes under a name."""

    def __init__(self, name: str, width: int, height: int, *, stale_after: float = STALE_AFTER):
        super().__init__()
        self.name = validate_name(name)
        self.width = width
        self.height = height
        self.stale_after = stale_after
        self._reader: ShmReader | None = None
        self._last_arrival: float | None = None
        self._period: float | None = None

    @property
    def connected(self) -> bool:
        return self._reader is not None and self._reader.connected

    def describe(self) -> str:
        state = "connected" if self.connected else "waiting for a writer"
        return f"shm:{self.name} ({state})"

    def _open(self) -> None:
        self._reader = ShmReader(self.name, stale_after=self.stale_after)

    def _close(self) -> None:
        if self._reader is not None:
            self._reader.close()
            self._reader = None
        self._last_arrival = self._period = None

    def _read(self, timeout: float) -> Frame | None:
        deadline = now() + timeout
        while True:
            try:
                got = self._reader.read()
            except ShmError as error:
                raise TransportError(str(error)) from error
            current = now()
            if got is not None:
                self._learn_period(current)
                pixels, meta = got
                frame = Frame(pixels, meta.pixel_format, meta.capture_time, meta.frame_counter)
                return frame.fitted(self.width, self.height)
            if current >= deadline:
                return None
            time.sleep(min(self._poll_interval(current), deadline - current))

    def _learn_period(self, arrival: float) -> None:
        if self._last_arrival is not None:
            interval = arrival - self._last_arrival
            if interval > MAX_PERIOD:
                self._period = None
            elif self._period is None:
                self._period = interval
            else:
                self._period += PERIOD_SMOOTHING * (interval - self._period)
        self._last_arrival = arrival

    def _poll_interval(self, current: float) -> float:
        """How long to sleep before the next look: short only while a frame is due."""
        if self._period is None:
            return POLL_INTERVAL
        due = self._last_arrival + self._period
        if current < due - DUE_EARLY:
            return min(POLL_INTERVAL, due - DUE_EARLY - current)
        if current < due + self._period:
            return DUE_POLL_INTERVAL
        return POLL_INTERVAL


class ShmSink(Sink):
    """Publishes frames under a name; the first frame's size may differ from the opened one."""

    def __init__(self, name: str, width: int, height: int, pixel_format: str = "rgba"):
        super().__init__()
        self.name = validate_name(name)
        self.width = width
        self.height = height
        self.pixel_format = pixel_format
        self._writer: ShmWriter | None = None

    @property
    def connected(self) -> bool:
        return self._writer is not None

    def describe(self) -> str:
        return f"shm:{self.name}"

    def _open(self) -> None:
        try:
            self._writer = ShmWriter(self.name, self.width, self.height, self.pixel_format)
        except ShmError as error:
            raise TransportError(str(error)) from error

    def _close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def _write(self, frame: Frame) -> None:
        self._writer.write(frame.pixels, frame.capture_time, frame.pixel_format)


def list_streams() -> list[tuple[str, Header]]:
    """Frame streams that exist now, with their headers; Linux only (it reads /dev/shm).

    Other systems offer no way to list shared memory, so there the list is empty.
    """
    folder = Path("/dev/shm")
    if not sys.platform.startswith("linux") or not folder.is_dir():
        return []
    streams = []
    for path in sorted(folder.iterdir()):
        try:
            validate_name(path.name)
            if path.stat().st_size != INDEX_SEGMENT_SIZE:
                continue
            with path.open("rb") as segment:
                header = parse_header(segment.read(INDEX_SEGMENT_SIZE), INDEX_SEGMENT_SIZE)
        except (ValueError, OSError, ShmError):
            continue
        if header is not None:
            streams.append((path.name, header))
    return streams
