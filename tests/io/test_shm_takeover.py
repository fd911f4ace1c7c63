"""Taking a name over, checked against a writer written from the specification (spec_peer.py)."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from bridge.io import shm_protocol
from bridge.io.shm_protocol import ShmInUseError, ShmReader, ShmWriter

SPEC_PEER = Path(__file__).with_name("spec_peer.py")
SHM = Path("/dev/shm")
pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="the spec peer maps segments from /dev/shm"
)


def spec_writer(name: str, *options: object, width: int = 32, height: int = 16):
    """Start spec_peer.py as a writer; returns the process and its `ready` report."""
    process = subprocess.Popen(
        [
            sys.executable,
            str(SPEC_PEER),
            "writer",
            name,
            str(width),
            str(height),
            *map(str, options),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    line = process.stdout.readline()
    if not line.startswith("ready "):
        process.kill()
        pytest.fail(f"spec peer did not start: {line!r} {process.communicate()[1]}")
    return process, json.loads(line.removeprefix("ready "))


def dead_spec_writer(name: str, *options: object) -> dict:
    """A spec writer that publishes a few frames and dies without closing; what it left."""
    process, _ = spec_writer(name, "--frames", 12, *options)
    out, err = process.communicate(timeout=60)
    assert process.returncode == 0, err
    return json.loads(out.splitlines()[-1].removeprefix("done "))


def index_bytes(name: str) -> bytes:
    return (SHM / name).read_bytes()


def header(name: str) -> dict:
    data = index_bytes(name)
    seq, generation = struct.unpack_from("<QI", data, 32)
    header_size, buffer_count = (
        struct.unpack_from("<H", data, 10)[0],
        struct.unpack_from("<I", data, 20)[0],
    )
    return {
        "magic": data[:8],
        "header_size": header_size,
        "buffer_count": buffer_count,
        "writer_pid": struct.unpack_from("<I", data, 16)[0],
        "seq": seq,
        "generation": generation,
        "frame_counter": struct.unpack_from("<Q", data, 80)[0],
        "buffer_seqs": struct.unpack_from(f"<{buffer_count}Q", data, 96),
        "reserved": data[header_size:],
    }


def wait_for(condition, timeout: float = 30.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.005)
    pytest.fail(f"condition not met within {timeout} s")


def test_a_reader_never_returns_a_dead_writers_pixels_when_a_new_writer_reuses_its_generation(
    shm_name,
):
    first, report = spec_writer(shm_name, "--salt", 1)
    reader = ShmReader(shm_name, stale_after=0.5)
    try:
        _, meta = wait_for(reader.read)
        assert meta.generation == report["generation"]
        first.kill()
        first.wait(30)
        # A writer that restarts generations at 1, as an earlier text of the specification said.
        second, taken = spec_writer(shm_name, "--salt", 2, "--generation", report["generation"])
        try:
            assert taken["generation"] == meta.generation
            frames = []
            while len(frames) < 10:
                got = wait_for(reader.read)
                if got[1].writer_pid == second.pid:
                    frames.append(got)
        finally:
            second.kill()
            second.communicate(timeout=30)
    finally:
        reader.close()
    from tests.io.spec_peer import fill

    for pixels, meta in frames:
        assert (pixels == fill(meta.frame_counter, 2)).all(), "pixels of the dead writer"


@pytest.mark.parametrize("corrupt", [False, True], ids=["valid", "invalid header"])
def test_taking_over_a_four_buffer_writer_grows_every_counter_and_zeroes_reserved_bytes(
    shm_name, corrupt
):
    left = dead_spec_writer(shm_name, "--buffers", 4, *(["--corrupt"] if corrupt else []))
    before = header(shm_name)
    assert any(index_bytes(shm_name)[112:128])  # its buffer_seq 2 and 3 lie past our header
    dead_segment = SHM / f"{shm_name}_{before['generation']:08x}"
    assert dead_segment.exists()

    with ShmWriter(shm_name, 32, 16) as writer:
        taken = header(shm_name)
        assert taken["magic"] == b"SDBFRAME" and taken["writer_pid"] == os.getpid()
        assert (taken["header_size"], taken["buffer_count"]) == (112, 2)
        assert not any(taken["reserved"])  # bytes past header_size are zero
        assert taken["seq"] % 2 == 0 and taken["seq"] > left["seq"]
        assert all(s % 2 == 0 and s > max(before["buffer_seqs"]) for s in taken["buffer_seqs"])
        assert taken["generation"] == 0  # no frame of the new writer yet
        assert not dead_segment.exists()
        counter = writer.write(np.zeros((16, 32, 4), np.uint8))
        published = header(shm_name)
    assert counter == published["frame_counter"] == left["frame_counter"] + 1
    assert published["generation"] == before["generation"] + 1


def test_a_takeover_keeps_the_magic_and_removes_the_dead_segment_after_the_header(
    shm_name, monkeypatch
):
    dead_spec_writer(shm_name)
    dead_generation = header(shm_name)["generation"]
    magics: list[bytes] = []
    headers_at_removal: list[dict] = []

    class Spy:  # every 64-bit store of the takeover looks at the magic first
        def __init__(self, real: struct.Struct) -> None:
            self.real = real

        def pack_into(self, buf, offset, value) -> None:
            magics.append(index_bytes(shm_name)[:8])
            self.real.pack_into(buf, offset, value)

        def unpack_from(self, buf, offset=0):
            return self.real.unpack_from(buf, offset)

    real_unlink = shm_protocol._unlink_leftover

    def unlink_leftover(name: str) -> None:
        headers_at_removal.append(header(shm_name))
        real_unlink(name)

    monkeypatch.setattr(shm_protocol, "_U64", Spy(shm_protocol._U64))
    monkeypatch.setattr(shm_protocol, "_unlink_leftover", unlink_leftover)
    with ShmWriter(shm_name, 32, 16):
        pass
    assert magics and set(magics) == {b"SDBFRAME"}
    [at_removal] = headers_at_removal
    assert at_removal["writer_pid"] == os.getpid() and at_removal["seq"] % 2 == 0
    assert at_removal["generation"] == 0 != dead_generation


def test_a_writer_makes_no_frame_segment_before_its_first_frame_which_is_generation_one(
    shm_name,
):
    with ShmWriter(shm_name, 32, 16, "rgb") as writer:
        assert header(shm_name)["generation"] == 0
        assert list(SHM.glob(f"{shm_name}_*")) == []
        writer.write(np.zeros((16, 32, 3), np.uint8))
        assert header(shm_name)["generation"] == 1
        assert [path.name for path in SHM.glob(f"{shm_name}_*")] == [f"{shm_name}_00000001"]


def test_a_name_another_writer_is_still_creating_is_refused(shm_name):
    (SHM / shm_name).touch()  # created, not yet sized
    with pytest.raises(ShmInUseError, match="being created by another writer"):
        ShmWriter(shm_name, 8, 8)
