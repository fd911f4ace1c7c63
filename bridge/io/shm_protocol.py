"""Shared-memory frame protocol, version 1: one writer, any number of readers, no locks.

This file is meant to be copied next to a TouchDesigner or OBS script, so it needs only the
standard library and numpy. docs/shm-protocol.md is the specification; in short:

* An index segment named `<name>` (4096 bytes) holds a little-endian header: who writes, a
  heartbeat, and, under a sequence counter, which buffer holds the newest frame and its size.
* Pixels live in a frame segment named `<name>_<generation as 8 hex digits>` with two buffers.
  The writer fills the buffer readers are not pointed at, then publishes it; a new size gets a
  new generation, hence a new frame segment, so readers pick size changes up by name.
* Each buffer has its own sequence number, odd while the writer fills it. A reader copies a
  buffer and keeps the copy only if that number did not move: no torn frame, and the writer
  never waits for a reader.

Example, writer side::

    with ShmWriter("td-in", 512, 512, "rgba") as writer:
        writer.write(pixels)  # uint8 array, 512 x 512 x 4

Reader side::

    reader = ShmReader("td-in")
    got = reader.read()  # None, or (pixels, FrameMeta) for a frame not seen before
"""

import math
import os
import re
import struct
import sys
import threading
import time
from dataclasses import dataclass, replace
from multiprocessing import resource_tracker, shared_memory

import numpy as np

MAGIC = b"SDBFRAME"
VERSION = 1
INDEX_SEGMENT_SIZE = 4096
FIXED_HEADER_SIZE = 96
BUFFER_SEQ_OFFSET = FIXED_HEADER_SIZE  # the buffer_seq table follows the fixed fields
MIN_BUFFERS = 2
MAX_BUFFERS = 16
WRITER_BUFFERS = 2
MAX_DIMENSION = 16384
BUFFER_ALIGNMENT = 64
FLAG_CLOSED = 1

# Pixel format code -> (name, channels).
PIXEL_FORMAT_CODES: dict[int, tuple[str, int]] = {
    1: ("rgb", 3),
    2: ("rgba", 4),
    3: ("bgr", 3),
    4: ("bgra", 4),
}
_CODE_OF_FORMAT = {name: code for code, (name, _) in PIXEL_FORMAT_CODES.items()}

NAME_RULE = "1 to 20 characters from A-Z a-z 0-9 _ -, starting with a letter or digit"
_NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,19}")

HEARTBEAT_INTERVAL = 0.1
# The writer beats twice as often as it promises, on a fixed grid, so a beat the scheduler
# delays by up to one period still keeps the promise.
BEAT_PERIOD = HEARTBEAT_INTERVAL / 2
STALE_AFTER = 1.0
REATTACH_INTERVAL = 0.25
READ_ATTEMPTS = 64

# Byte offsets of the fields that are read or written on their own.
_FLAGS = 12
_HEARTBEAT = 24
_SEQ = 32
_META = 40
_COUNTER = 80
# Counters a writer of this protocol cannot have reached; a larger one is taken as garbage.
_COUNTER_LIMIT = 1 << 62

_FIXED = struct.Struct("<8sHHIIIdQIIIIIIQIIQd")
_OWNER_FIELDS = struct.Struct("<8sHHIIIdQ")
_META_FIELDS = struct.Struct("<IIIIIIQIIQd")
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")
_F64 = struct.Struct("<d")
assert _FIXED.size == FIXED_HEADER_SIZE == _OWNER_FIELDS.size + _META_FIELDS.size


class ShmError(Exception):
    """Base class of the errors this protocol raises."""


class ShmProtocolError(ShmError):
    """A segment's header or size breaks the protocol; nothing was read from its pixels."""


class ShmInUseError(ShmError):
    """Another live writer already publishes under this name."""


def clock() -> float:
    """Seconds on the clock of every timestamp in the protocol: `time.perf_counter()`.

    CLOCK_MONOTONIC on Linux, QueryPerformanceCounter on Windows, mach_absolute_time on macOS:
    the same origin in every process of one machine.
    """
    return time.perf_counter()


def validate_name(name: str) -> str:
    """Return `name` if it may name a frame stream, else raise ValueError saying the rule.

    Names are short because macOS limits shared-memory names to 30 characters and the frame
    segment adds 9 (`_` and 8 hex digits). Names are never shortened silently: two long names
    cut to the same prefix would collide.
    """
    if not isinstance(name, str) or not _NAME_PATTERN.fullmatch(name):
        raise ValueError(f"Shared-memory name {name!r} is invalid; use {NAME_RULE}.")
    return name


def frame_segment_name(name: str, generation: int) -> str:
    """Name of the segment that holds the pixels of one generation."""
    return f"{name}_{generation:08x}"


@dataclass(frozen=True)
class Header:
    """The index segment's header, as parsed and validated from one consistent snapshot."""

    version: int
    header_size: int
    flags: int
    writer_pid: int
    buffer_count: int
    heartbeat: float
    seq: int
    generation: int
    width: int
    height: int
    channels: int
    pixel_format_code: int
    row_stride: int
    buffer_stride: int
    active_buffer: int
    writer_session: int
    frame_counter: int
    capture_time: float
    buffer_seqs: tuple[int, ...]

    @property
    def closed(self) -> bool:
        """The writer closed the stream on purpose."""
        return bool(self.flags & FLAG_CLOSED)

    @property
    def pixel_format(self) -> str:
        """Pixel format name: rgb, rgba, bgr or bgra."""
        return PIXEL_FORMAT_CODES[self.pixel_format_code][0]

    @property
    def frame_bytes_needed(self) -> int:
        """Smallest frame segment that holds every buffer this header describes."""
        return self.buffer_count * self.buffer_stride


@dataclass(frozen=True)
class FrameMeta:
    """What a reader learns about a frame besides its pixels."""

    width: int
    height: int
    pixel_format: str
    frame_counter: int
    capture_time: float
    generation: int
    writer_pid: int


def parse_header(data: bytes, segment_size: int) -> Header | None:
    """Parse and validate a header snapshot; None while the writer has not written the magic yet.

    `data` is a copy of the segment's first bytes, `segment_size` the segment's full size.
    Raises ShmProtocolError for anything that breaks the protocol, so the values returned can
    be used to index the frame segment without further checks.
    """
    if len(data) < FIXED_HEADER_SIZE or segment_size < FIXED_HEADER_SIZE:
        raise ShmProtocolError(
            f"Segment of {segment_size} bytes is too small for the {FIXED_HEADER_SIZE}-byte "
            "frame header; it was not made by a frame-protocol writer."
        )
    magic, *fields = _FIXED.unpack_from(data, 0)
    if magic == bytes(len(MAGIC)):
        return None
    if magic != MAGIC:
        raise ShmProtocolError(
            f"Segment starts with {magic!r} instead of {MAGIC!r}; it is not a frame-protocol "
            "segment, so pick another name."
        )
    # The fixed fields after the magic come in the order of Header's fields.
    header = Header(*fields, buffer_seqs=())
    if header.version != VERSION:
        raise ShmProtocolError(
            f"Writer speaks frame protocol version {header.version} but this reader speaks "
            f"version {VERSION}; use matching releases on both sides."
        )
    count = header.buffer_count
    if not MIN_BUFFERS <= count <= MAX_BUFFERS:
        raise ShmProtocolError(
            f"Header declares {count} buffers; the protocol allows {MIN_BUFFERS} to {MAX_BUFFERS}."
        )
    expected_size = BUFFER_SEQ_OFFSET + 8 * count
    if header.header_size != expected_size or expected_size > min(len(data), segment_size):
        raise ShmProtocolError(
            f"Header size {header.header_size} does not match {count} buffers "
            f"({expected_size} bytes) within a {segment_size}-byte segment."
        )
    if not (math.isfinite(header.heartbeat) and math.isfinite(header.capture_time)):
        raise ShmProtocolError("Header holds a heartbeat or capture time that is not a number.")
    seqs = tuple(_U64.unpack_from(data, BUFFER_SEQ_OFFSET + 8 * i)[0] for i in range(count))
    header = replace(header, buffer_seqs=seqs)
    if header.generation != 0:
        _check_frame_fields(header)
    return header


def _check_frame_fields(header: Header) -> None:
    if not (1 <= header.width <= MAX_DIMENSION and 1 <= header.height <= MAX_DIMENSION):
        raise ShmProtocolError(
            f"Frame size {header.width}x{header.height} is outside 1..{MAX_DIMENSION} pixels."
        )
    if header.pixel_format_code not in PIXEL_FORMAT_CODES:
        raise ShmProtocolError(
            f"Pixel format code {header.pixel_format_code} is unknown; the protocol defines "
            f"{sorted(PIXEL_FORMAT_CODES)}."
        )
    name, channels = PIXEL_FORMAT_CODES[header.pixel_format_code]
    if header.channels != channels:
        raise ShmProtocolError(
            f"Header says {header.channels} channels but pixel format {name} has {channels}."
        )
    row_bytes = header.width * channels
    if header.row_stride < row_bytes or header.row_stride * header.height > header.buffer_stride:
        raise ShmProtocolError(
            f"Row stride {header.row_stride} and buffer stride {header.buffer_stride} cannot "
            f"hold {header.height} rows of {row_bytes} bytes."
        )
    if header.active_buffer >= header.buffer_count:
        raise ShmProtocolError(
            f"Active buffer {header.active_buffer} does not exist; there are {header.buffer_count}."
        )


class ShmWriter:
    """Publishes frames under `name`; `close` removes the segments.

    Creating a writer claims the name: a segment left by a writer that died (its process is
    gone, or its heartbeat has stopped) is taken over, while a live writer makes this raise
    ShmInUseError. A background thread refreshes the heartbeat at least every
    HEARTBEAT_INTERVAL seconds so readers can tell an idle writer from a dead one. The first
    frame segment is made by the first `write`; `width`, `height` and `pixel_format` are only
    checked here and are the defaults of `write`. Call `write` from one thread only.
    """

    def __init__(
        self,
        name: str,
        width: int,
        height: int,
        pixel_format: str = "rgba",
        *,
        stale_after: float = STALE_AFTER,
    ) -> None:
        self.name = validate_name(name)
        _check_frame_request(width, height, pixel_format)
        self._index, self._generation, self._counter, first_buffer_seq = _claim(
            self.name, stale_after
        )
        self._buffer_seqs = [first_buffer_seq] * WRITER_BUFFERS
        # Tells this writer's frames from those of an earlier writer with the same counters.
        self._session = int.from_bytes(os.urandom(4), "little") | 1
        self._frames: shared_memory.SharedMemory | None = None
        self._retired: shared_memory.SharedMemory | None = None
        self._shape = (height, width, PIXEL_FORMAT_CODES[_CODE_OF_FORMAT[pixel_format]][1])
        self._pixel_format = pixel_format
        self._row_stride = 0
        self._buffer_stride = 0
        self._active = 0
        self._fresh_generation = True
        self._stop = threading.Event()
        self._beating = threading.Thread(
            target=self._beat_until_stopped, name=f"shm-heartbeat-{name}", daemon=True
        )
        self._beating.start()

    def write(
        self,
        pixels: np.ndarray,
        capture_time: float | None = None,
        pixel_format: str | None = None,
    ) -> int:
        """Publish one frame and return its counter; a new size or format starts a generation.

        `pixels` is uint8, height x width x channels; `capture_time` defaults to `clock()`.
        """
        if self._index is None:
            raise ShmError(f"Writer for {self.name!r} is closed; create a new ShmWriter.")
        pixel_format = pixel_format or self._pixel_format
        if pixel_format not in _CODE_OF_FORMAT:
            raise ValueError(
                f"Unknown pixel format {pixel_format!r}; use one of {', '.join(_CODE_OF_FORMAT)}."
            )
        pixels = np.asarray(pixels)
        _, channels = PIXEL_FORMAT_CODES[_CODE_OF_FORMAT[pixel_format]]
        if pixels.dtype != np.uint8 or pixels.ndim != 3 or pixels.shape[2] != channels:
            raise ValueError(
                f"Pixels must be uint8 of shape (height, width, {channels}) for {pixel_format}; "
                f"got {pixels.dtype} {pixels.shape}."
            )
        height, width = pixels.shape[:2]
        if (
            self._frames is None
            or pixels.shape != self._shape
            or pixel_format != self._pixel_format
        ):
            _check_frame_request(width, height, pixel_format)
            self._allocate(width, height, pixel_format)
        capture_time = clock() if capture_time is None else float(capture_time)

        buffer = self._back_buffer()
        index_buf = self._index.buf
        seq_offset = BUFFER_SEQ_OFFSET + 8 * buffer
        self._buffer_seqs[buffer] += 1
        _U64.pack_into(index_buf, seq_offset, self._buffer_seqs[buffer])
        target = np.ndarray(
            self._shape,
            np.uint8,
            buffer=self._frames.buf,
            offset=buffer * self._buffer_stride,
            strides=(self._row_stride, channels, 1),
        )
        target[...] = pixels
        del target
        self._buffer_seqs[buffer] += 1
        _U64.pack_into(index_buf, seq_offset, self._buffer_seqs[buffer])

        self._counter += 1
        self._active = buffer
        self._publish(capture_time)
        if self._retired is not None:
            _unlink(self._retired)
            self._retired = None
        return self._counter

    def close(self) -> None:
        """Mark the stream closed for readers and remove its segments; safe to call twice."""
        if self._index is None:
            return
        self._stop.set()
        self._beating.join()
        index, self._index = self._index, None
        flags = _U32.unpack_from(index.buf, _FLAGS)[0]
        _U32.pack_into(index.buf, _FLAGS, flags | FLAG_CLOSED)
        for segment in (self._retired, self._frames):
            if segment is not None:
                _unlink(segment)
        self._retired = self._frames = None
        _unlink(index)

    def __enter__(self) -> "ShmWriter":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _back_buffer(self) -> int:
        if self._fresh_generation:
            self._fresh_generation = False
            return 0
        return (self._active + 1) % WRITER_BUFFERS

    def _allocate(self, width: int, height: int, pixel_format: str) -> None:
        """Create the frame segment of the next generation; the old one goes after publishing."""
        channels = PIXEL_FORMAT_CODES[_CODE_OF_FORMAT[pixel_format]][1]
        row_stride = width * channels
        buffer_stride = -(-row_stride * height // BUFFER_ALIGNMENT) * BUFFER_ALIGNMENT
        segment = None
        while segment is None:
            self._generation = (self._generation % 0xFFFFFFFF) + 1
            segment = _create_fresh(
                frame_segment_name(self.name, self._generation), WRITER_BUFFERS * buffer_stride
            )
        if self._frames is not None:
            if self._retired is not None:
                _unlink(self._retired)
            self._retired = self._frames
        self._frames = segment
        self._shape = (height, width, channels)
        self._pixel_format = pixel_format
        self._row_stride = row_stride
        self._buffer_stride = buffer_stride
        self._fresh_generation = True

    def _publish(self, capture_time: float) -> None:
        buf = self._index.buf
        seq = _U64.unpack_from(buf, _SEQ)[0]
        _U64.pack_into(buf, _SEQ, seq + 1)
        height, width, channels = self._shape
        _META_FIELDS.pack_into(
            buf,
            _META,
            self._generation,
            width,
            height,
            channels,
            _CODE_OF_FORMAT[self._pixel_format],
            self._row_stride,
            self._buffer_stride,
            self._active,
            self._session,
            self._counter,
            capture_time,
        )
        _U64.pack_into(buf, _SEQ, seq + 2)
        _F64.pack_into(buf, _HEARTBEAT, clock())

    def _beat_until_stopped(self) -> None:
        index = self._index
        due = clock() + BEAT_PERIOD
        while not self._stop.wait(max(0.0, due - clock())):
            moment = clock()
            _F64.pack_into(index.buf, _HEARTBEAT, moment)
            # Keep to the grid; after a long stall, start it again from now.
            due = due + BEAT_PERIOD if due + BEAT_PERIOD > moment else moment + BEAT_PERIOD


class ShmReader:
    """Reads the newest frame published under `name`; never removes the writer's segments.

    The reader attaches lazily and re-attaches by itself when the writer restarts, so it may be
    created before the writer exists. It is `connected` while the writer's heartbeat is younger
    than `stale_after` seconds and the writer has not closed.
    """

    def __init__(self, name: str, *, stale_after: float = STALE_AFTER) -> None:
        self.name = validate_name(name)
        self.stale_after = float(stale_after)
        self._index: shared_memory.SharedMemory | None = None
        self._frames: shared_memory.SharedMemory | None = None
        # A frame segment belongs to one writer: a writer taking the name over may reuse a
        # generation number, so the segment is known by (writer_session, generation).
        self._frames_key: tuple[int, int] | None = None
        self._last_attach_try = -math.inf
        self._last_seen: tuple[int, int, int] | None = None
        # A status display asks `connected` from another thread while the reading thread may
        # re-attach or detach: one lock keeps a segment from closing under the other.
        self._lock = threading.Lock()

    @property
    def connected(self) -> bool:
        """Whether a live writer is attached: not closed, heartbeat fresh."""
        with self._lock:
            index = self._attach_if_due()
            return index is not None and self._writer_alive(index)

    def read(self) -> tuple[np.ndarray, FrameMeta] | None:
        """A copy of the newest frame and its metadata, or None if there is no frame not yet read.

        Raises ShmProtocolError when the segment breaks the protocol.
        """
        with self._lock:
            return self._read()

    def _read(self) -> tuple[np.ndarray, FrameMeta] | None:
        index = self._attach_if_due()
        if index is None:
            return None
        for _ in range(READ_ATTEMPTS):
            header = self._snapshot(index)
            if header is None:
                continue
            if header.generation == 0 or header.closed:
                return None
            seen = (header.writer_session, header.generation, header.frame_counter)
            if seen == self._last_seen:
                return None
            frames = self._frames_of(header)
            if frames is None:
                continue
            buffer = header.active_buffer
            before = header.buffer_seqs[buffer]
            if before % 2:
                continue
            source = np.ndarray(
                (header.height, header.width, header.channels),
                np.uint8,
                buffer=frames.buf,
                offset=buffer * header.buffer_stride,
                strides=(header.row_stride, header.channels, 1),
            )
            pixels = source.copy()
            del source
            after = _U64.unpack_from(index.buf, BUFFER_SEQ_OFFSET + 8 * buffer)[0]
            if after != before:
                continue
            self._last_seen = seen
            return pixels, _meta_of(header)
        return None

    def close(self) -> None:
        """Detach from the segments; the writer's segments stay. Safe to call twice."""
        with self._lock:
            self._detach()

    def __enter__(self) -> "ShmReader":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _attach_if_due(self) -> shared_memory.SharedMemory | None:
        """The index segment; while the writer looks gone, look the name up again now and then.

        A writer that restarts after a clean close creates a new segment under the same name,
        which only a fresh lookup finds.
        """
        if self._index is not None and self._writer_alive(self._index):
            return self._index
        moment = clock()
        if moment - self._last_attach_try < REATTACH_INTERVAL:
            return self._index
        self._last_attach_try = moment
        try:
            fresh = _attach(self.name)
        except (FileNotFoundError, ValueError):  # ValueError: created but not yet sized
            return self._index
        self._detach()
        self._index = fresh
        return fresh

    def _writer_alive(self, index: shared_memory.SharedMemory) -> bool:
        buf = index.buf
        if len(buf) < FIXED_HEADER_SIZE or bytes(buf[:8]) != MAGIC:
            return False
        flags = _U32.unpack_from(buf, _FLAGS)[0]
        heartbeat = _F64.unpack_from(buf, _HEARTBEAT)[0]
        return not flags & FLAG_CLOSED and abs(clock() - heartbeat) <= self.stale_after

    def _snapshot(self, index: shared_memory.SharedMemory) -> Header | None:
        """A validated header copied while no publish was in progress, else None."""
        buf = index.buf
        size = len(buf)
        seq = _U64.unpack_from(buf, _SEQ)[0] if size >= FIXED_HEADER_SIZE else 0
        if seq % 2:
            return None
        data = bytes(buf[: min(size, BUFFER_SEQ_OFFSET + 8 * MAX_BUFFERS)])
        if size >= FIXED_HEADER_SIZE and _U64.unpack_from(buf, _SEQ)[0] != seq:
            return None
        header = parse_header(data, size)
        if header is None or header.seq != seq:
            return None
        return header

    def _frames_of(self, header: Header) -> shared_memory.SharedMemory | None:
        """The frame segment of the header's generation, checked to hold every buffer."""
        key = (header.writer_session, header.generation)
        if self._frames is None or self._frames_key != key:
            self._close_frames()
            try:
                self._frames = _attach(frame_segment_name(self.name, header.generation))
            except FileNotFoundError:
                return None  # the writer has moved on to a newer generation
            except ValueError as error:  # an empty segment cannot be mapped
                raise ShmProtocolError(
                    f"Frame segment of {self.name!r} cannot be mapped ({error}); "
                    "restart the writer."
                ) from None
            self._frames_key = key
        if len(self._frames.buf) < header.frame_bytes_needed:
            raise ShmProtocolError(
                f"Frame segment of {self.name!r} has {len(self._frames.buf)} bytes but its "
                f"header needs {header.frame_bytes_needed}."
            )
        return self._frames

    def _close_frames(self) -> None:
        if self._frames is not None:
            self._frames.close()
            self._frames = None
            self._frames_key = None

    def _detach(self) -> None:
        self._close_frames()
        if self._index is not None:
            self._index.close()
            self._index = None


def _meta_of(header: Header) -> FrameMeta:
    return FrameMeta(
        width=header.width,
        height=header.height,
        pixel_format=header.pixel_format,
        frame_counter=header.frame_counter,
        capture_time=header.capture_time,
        generation=header.generation,
        writer_pid=header.writer_pid,
    )


def _check_frame_request(width: int, height: int, pixel_format: str) -> None:
    if pixel_format not in _CODE_OF_FORMAT:
        raise ValueError(
            f"Unknown pixel format {pixel_format!r}; use one of {', '.join(_CODE_OF_FORMAT)}."
        )
    if not (1 <= width <= MAX_DIMENSION and 1 <= height <= MAX_DIMENSION):
        raise ValueError(
            f"Frame size {width}x{height} is outside 1..{MAX_DIMENSION} pixels per side."
        )


def _claim(name: str, stale_after: float) -> tuple[shared_memory.SharedMemory, int, int, int]:
    """Create or take over the index segment: (segment, last generation, counter, buffer seq)."""
    try:
        index = _create(name, INDEX_SEGMENT_SIZE)
    except FileExistsError:
        pass
    else:
        _write_new_header(index, seq=0, buffer_seq=0)
        return index, 0, 0, 0
    try:
        index = _attach(name)
    except ValueError:  # 0 bytes: another writer has created it and not yet sized it
        raise ShmInUseError(
            f"Shared-memory name {name!r} is being created by another writer; "
            "close that writer or choose another name."
        ) from None
    try:
        _check_previous_writer(index, name, stale_after)
    except BaseException:
        index.close()
        raise
    # Counters only grow, even past a header that fails validation: read them where they lie.
    buf = index.buf
    seq = _U64.unpack_from(buf, _SEQ)[0]
    generation = _U32.unpack_from(buf, _META)[0]
    counter = _U64.unpack_from(buf, _COUNTER)[0]
    seqs = [_U64.unpack_from(buf, BUFFER_SEQ_OFFSET + 8 * i)[0] for i in range(MAX_BUFFERS)]
    buffer_seq = _grown(max(seqs)) + 1 & ~1
    _write_new_header(index, seq=_grown(seq) + 1 & ~1, buffer_seq=buffer_seq)
    if generation:
        _unlink_leftover(frame_segment_name(name, generation))
    return index, generation, _grown(counter) - 1, buffer_seq


def _grown(value: int) -> int:
    """`value + 1`, or 1 where a stray value leaves no room to keep counting."""
    return value + 1 if value < _COUNTER_LIMIT else 1


def _check_previous_writer(
    index: shared_memory.SharedMemory, name: str, stale_after: float
) -> None:
    """Raise unless the index segment was left by a writer that is gone.

    Liveness is judged from the owner fields alone, which every version keeps at the same
    offsets, so a live writer of another protocol version is refused rather than overwritten.
    """
    buf = index.buf
    if len(buf) < INDEX_SEGMENT_SIZE:
        raise ShmProtocolError(
            f"Shared-memory segment {name!r} exists but is too small to be a frame stream; "
            "pick another name."
        )
    magic, _, _, flags, pid, _, heartbeat, _ = _OWNER_FIELDS.unpack_from(buf, 0)
    if magic == bytes(8):
        return  # its writer died while creating it
    if magic != MAGIC:
        raise ShmProtocolError(
            f"Shared-memory segment {name!r} belongs to another program; pick another name."
        )
    if _is_live(index, flags, pid, heartbeat, stale_after):
        raise ShmInUseError(
            f"Shared-memory name {name!r} is already used by a live writer (pid {pid}); "
            "close that writer or choose another name."
        )


def _is_live(
    index: shared_memory.SharedMemory, flags: int, pid: int, heartbeat: float, stale_after: float
) -> bool:
    """A writer lives if it has not closed, beats, and its process exists (where checkable).

    A fresh heartbeat alone is not proof (the writer may have been killed a moment ago), so
    the heartbeat is watched until it moves or `stale_after` passes.
    """
    if flags & FLAG_CLOSED or not abs(clock() - heartbeat) <= stale_after:
        return False
    if not _process_exists(pid):
        return False
    deadline = clock() + stale_after
    while clock() < deadline:
        if _F64.unpack_from(index.buf, _HEARTBEAT)[0] != heartbeat:
            return True
        time.sleep(HEARTBEAT_INTERVAL / 4)
    return False


def _process_exists(pid: int) -> bool:
    """False only when the process is known to be gone; Windows cannot tell, so True there."""
    if sys.platform == "win32" or pid <= 0:
        return pid > 0
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _write_new_header(index: shared_memory.SharedMemory, seq: int, buffer_seq: int) -> None:
    """Write a header with no frame yet (generation 0) under an odd `seq`; `seq` is even.

    A magic already in place stays (readers of a taken-over segment never see it vanish); a
    new segment gets it last. Everything past the header, to the segment's end, is zeroed.
    """
    buf = index.buf
    _U64.pack_into(buf, _SEQ, seq + 1)
    header_size = BUFFER_SEQ_OFFSET + 8 * WRITER_BUFFERS
    buf[:_META] = _OWNER_FIELDS.pack(
        bytes(buf[:8]),
        VERSION,
        header_size,
        0,
        os.getpid(),
        WRITER_BUFFERS,
        clock(),
        seq + 1,
    )
    buf[_META:FIXED_HEADER_SIZE] = bytes(FIXED_HEADER_SIZE - _META)  # generation 0: no frame
    for i in range(WRITER_BUFFERS):
        _U64.pack_into(buf, BUFFER_SEQ_OFFSET + 8 * i, buffer_seq)
    buf[header_size:] = bytes(len(buf) - header_size)  # reserved: zero
    _U64.pack_into(buf, _SEQ, seq + 2)
    buf[:8] = MAGIC


# Segment handling. Before Python 3.13 every process that attaches a segment registers it with
# its resource tracker, which unlinks it when that process exits: a reader closing would delete
# the writer's stream. The writer, too, handles unlinking itself (close, or the next writer's
# take-over), so no segment of this protocol is left to a resource tracker.

_TRACK_PARAMETER = sys.version_info >= (3, 13)


def _create(name: str, size: int) -> shared_memory.SharedMemory:
    if _TRACK_PARAMETER:
        return shared_memory.SharedMemory(name, create=True, size=size, track=False)
    segment = shared_memory.SharedMemory(name, create=True, size=size)
    _untrack(segment)
    return segment


def _attach(name: str) -> shared_memory.SharedMemory:
    if _TRACK_PARAMETER:
        return shared_memory.SharedMemory(name, track=False)
    segment = shared_memory.SharedMemory(name)
    _untrack(segment)
    return segment


def _untrack(segment: shared_memory.SharedMemory) -> None:
    if os.name == "posix":
        resource_tracker.unregister(segment._name, "shared_memory")


def _unlink(segment: shared_memory.SharedMemory) -> None:
    """Close and remove a segment; on Windows it goes when the last process closes it."""
    segment.close()
    try:
        if not _TRACK_PARAMETER and os.name == "posix":
            # unlink() unregisters; register first so the tracker's books stay balanced.
            resource_tracker.register(segment._name, "shared_memory")
        segment.unlink()
    except FileNotFoundError:
        pass


def _create_fresh(name: str, size: int) -> shared_memory.SharedMemory | None:
    """Create a segment, clearing a leftover of a dead writer; None if the name stays taken."""
    try:
        return _create(name, size)
    except FileExistsError:
        _unlink_leftover(name)
    try:
        return _create(name, size)
    except FileExistsError:
        return None


def _unlink_leftover(name: str) -> None:
    try:
        _unlink(_attach(name))
    except FileNotFoundError:
        pass
