"""Malformed headers and segment sizes are refused with ShmProtocolError (or read as no frame).

The header is built here from the layout table in docs/shm-protocol.md, not from the module's
own struct, so these tests also hold the implementation to the document.
"""

from __future__ import annotations

import struct
from multiprocessing import shared_memory

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bridge.io.shm_protocol import (
    Header,
    ShmProtocolError,
    ShmReader,
    clock,
    frame_segment_name,
    parse_header,
)

# Offsets and types exactly as docs/shm-protocol.md lists them.
LAYOUT = {
    "magic": (0, "8s"),
    "version": (8, "H"),
    "header_size": (10, "H"),
    "flags": (12, "I"),
    "writer_pid": (16, "I"),
    "buffer_count": (20, "I"),
    "heartbeat": (24, "d"),
    "seq": (32, "Q"),
    "generation": (40, "I"),
    "width": (44, "I"),
    "height": (48, "I"),
    "channels": (52, "I"),
    "pixel_format": (56, "I"),
    "row_stride": (60, "I"),
    "buffer_stride": (64, "Q"),
    "active_buffer": (72, "I"),
    "writer_session": (76, "I"),
    "frame_counter": (80, "Q"),
    "capture_time": (88, "d"),
}
INTEGER_FIELDS = [name for name, (_, kind) in LAYOUT.items() if kind in "HIQ"]


def valid_fields(width: int = 6, height: int = 4) -> dict[str, object]:
    """A header for one 6x4 rgba frame in buffer 1 of 2, stamped as if written just now."""
    return {
        "magic": b"SDBFRAME",
        "version": 1,
        "header_size": 112,
        "flags": 0,
        "writer_pid": 1,
        "buffer_count": 2,
        "heartbeat": clock(),
        "seq": 8,
        "generation": 3,
        "width": width,
        "height": height,
        "channels": 4,
        "pixel_format": 2,
        "row_stride": width * 4,
        "buffer_stride": width * 4 * height,
        "active_buffer": 1,
        "writer_session": 5,
        "frame_counter": 4,
        "capture_time": 1.5,
    }


def encode(fields: dict[str, object], buffer_seqs=(4, 6), size: int = 4096) -> bytearray:
    data = bytearray(size)
    for name, value in fields.items():
        offset, kind = LAYOUT[name]
        if offset + struct.calcsize("<" + kind) <= size:
            struct.pack_into("<" + kind, data, offset, value)
    for i, value in enumerate(buffer_seqs):
        if 96 + 8 * i + 8 <= size:
            struct.pack_into("<Q", data, 96 + 8 * i, value)
    return data


def check_header_is_safe(header: Header, segment_size: int) -> None:
    """What a parsed header promises: every byte it points at lies inside its buffers."""
    assert header.header_size <= segment_size
    if header.generation:
        last_byte = (
            header.active_buffer * header.buffer_stride
            + (header.height - 1) * header.row_stride
            + header.width * header.channels
        )
        assert last_byte <= header.frame_bytes_needed


def test_documented_layout_parses_to_the_documented_values():
    header = parse_header(bytes(encode(valid_fields())), 4096)
    assert (header.width, header.height, header.pixel_format) == (6, 4, "rgba")
    assert (header.active_buffer, header.frame_counter, header.buffer_seqs) == (1, 4, (4, 6))


def test_reader_reads_a_stream_written_from_the_document_alone(shm_name):
    fields = valid_fields()
    index = shared_memory.SharedMemory(shm_name, create=True, size=4096)
    frames = shared_memory.SharedMemory(frame_segment_name(shm_name, 3), create=True, size=192)
    try:
        index.buf[:4096] = encode(fields)
        expected = np.arange(96, dtype=np.uint8).reshape(4, 6, 4)
        frames.buf[96:192] = expected.tobytes()  # buffer 1 starts one buffer_stride in
        with ShmReader(shm_name) as reader:
            assert reader.connected
            pixels, meta = reader.read()
    finally:
        for segment in (index, frames):
            segment.close()
            segment.unlink()
    assert np.array_equal(pixels, expected)
    assert (meta.frame_counter, meta.capture_time, meta.pixel_format) == (4, 1.5, "rgba")


@settings(max_examples=400, deadline=None)
@given(data=st.binary(min_size=0, max_size=300), segment_size=st.integers(0, 1 << 20))
def test_arbitrary_bytes_parse_or_are_refused(data, segment_size):
    try:
        header = parse_header(data, segment_size)
    except ShmProtocolError:
        return
    if header is not None:
        check_header_is_safe(header, segment_size)


@settings(max_examples=400, deadline=None)
@given(
    field=st.sampled_from(INTEGER_FIELDS),
    value=st.integers(0, 2**64 - 1),
    segment_size=st.sampled_from([0, 50, 96, 111, 112, 4096]),
)
def test_one_corrupted_field_parses_safely_or_is_refused(field, value, segment_size):
    fields = valid_fields()
    kind = LAYOUT[field][1]
    fields[field] = value % (1 << (8 * struct.calcsize(kind)))
    try:
        header = parse_header(bytes(encode(fields, size=max(segment_size, 0))), segment_size)
    except ShmProtocolError:
        return
    if header is not None:
        check_header_is_safe(header, segment_size)


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    overrides=st.fixed_dictionaries(
        {},
        optional={
            "width": st.integers(0, 40),
            "height": st.integers(0, 40),
            "channels": st.integers(0, 6),
            "pixel_format": st.integers(0, 6),
            "row_stride": st.integers(0, 200),
            "buffer_stride": st.integers(0, 5000),
            "active_buffer": st.integers(0, 3),
            "buffer_count": st.integers(0, 20),
            "header_size": st.integers(0, 300),
            "version": st.integers(0, 3),
            "seq": st.integers(0, 20),
        },
    ),
    frame_segment_size=st.integers(1, 4096),
    index_size=st.sampled_from([64, 4096]),
)
def test_reader_on_a_malformed_segment_returns_a_frame_none_or_refuses(
    shm_name, overrides, frame_segment_size, index_size
):
    fields = {**valid_fields(), **overrides}
    index = shared_memory.SharedMemory(shm_name, create=True, size=index_size)
    frames = shared_memory.SharedMemory(
        frame_segment_name(shm_name, 3), create=True, size=frame_segment_size
    )
    try:
        index.buf[:] = encode(fields, size=index_size)
        with ShmReader(shm_name) as reader:
            try:
                got = reader.read()
            except ShmProtocolError:
                return
        if got is not None:
            pixels, meta = got
            assert pixels.shape == (meta.height, meta.width, len(meta.pixel_format))
            assert pixels.dtype == np.uint8
    finally:
        for segment in (index, frames):
            segment.close()
            segment.unlink()
