"""The shared-memory frame protocol between real processes: whole frames, takeovers, sizes."""

from __future__ import annotations

import json
import os
import struct
import sys
import threading
import time
from multiprocessing import shared_memory
from pathlib import Path

import numpy as np
import pytest

from bridge.io.shm_protocol import (
    ShmInUseError,
    ShmProtocolError,
    ShmReader,
    ShmWriter,
    frame_segment_name,
    validate_name,
)

STALE_AFTER = 0.5
SHM_FOLDER = Path("/dev/shm")
needs_dev_shm = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="lists segments through Linux's /dev/shm"
)


def wait_for(condition, timeout: float = 10.0, step: float = 0.005):
    """Poll `condition` until it returns something truthy; fail the test after `timeout`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(step)
    pytest.fail(f"condition not met within {timeout} s")


def test_reader_in_another_process_sees_only_whole_frames_in_increasing_order(
    shm_name, peer, start_peer
):
    height, width = 96, 128
    with ShmWriter(shm_name, width, height, "rgba") as writer:
        writer.write(peer.make_frame(1, height, width))
        reader_process = start_peer("reader", shm_name, 1.5)
        # Write flat out, much faster than the reader can copy and check.
        counter = 1
        deadline = time.monotonic() + 30
        while reader_process.poll() is None and time.monotonic() < deadline:
            counter = writer.write(peer.make_frame(counter + 1, height, width))
        out, err = reader_process.communicate(timeout=10)
        assert reader_process.returncode == 0, err
        report = json.loads(out)
        assert report["frames"] >= 20
        assert report["torn"] == 0
        assert report["increasing"]
        assert report["last"] <= counter


def test_reader_process_exiting_leaves_the_stream_to_the_writer_and_new_readers(
    shm_name, peer, start_peer
):
    with ShmWriter(shm_name, 32, 16, "rgba") as writer:
        writer.write(peer.make_frame(1, 16, 32))
        reader_process = start_peer("reader", shm_name, 0.2)
        out, err = reader_process.communicate(timeout=30)
        assert reader_process.returncode == 0, err
        assert json.loads(out)["frames"] >= 1
        assert "resource_tracker" not in err and "leaked" not in err

        counter = writer.write(peer.make_frame(2, 16, 32))
        with ShmReader(shm_name) as reader:
            pixels, meta = wait_for(reader.read)
        assert meta.frame_counter == counter
        assert peer.is_whole(pixels, counter)


def test_killed_writer_is_reported_disconnected_and_replaced_by_a_new_writer(
    shm_name, peer, start_peer
):
    writer_process = start_peer("writer", shm_name, 64, 48, 200)
    assert writer_process.stdout.readline().strip() == "ready"
    reader = ShmReader(shm_name, stale_after=STALE_AFTER)
    _, first = wait_for(reader.read)
    assert first.writer_pid == writer_process.pid
    assert reader.connected

    with pytest.raises(ShmInUseError, match=f"'{shm_name}' is already used by a live writer"):
        ShmWriter(shm_name, 64, 48)

    writer_process.kill()
    writer_process.wait()
    killed_at = time.monotonic()
    wait_for(lambda: not reader.connected)
    assert 0.2 < time.monotonic() - killed_at < STALE_AFTER + 2.0
    got = reader.read()  # the last frame the killed writer published, if not read yet
    last_of_killed = got[1] if got is not None else first

    with ShmWriter(shm_name, 64, 48, "rgba") as successor:
        counter = successor.write(peer.make_frame(7, 48, 64))
        pixels, meta = wait_for(reader.read)
        assert meta.writer_pid == os.getpid()
        assert meta.frame_counter == counter
        assert counter > last_of_killed.frame_counter  # counters go on where the dead writer left
        assert reader.connected
        if SHM_FOLDER.is_dir():
            leftover = frame_segment_name(shm_name, last_of_killed.generation)
            assert not (SHM_FOLDER / leftover).exists()
    reader.close()


def test_second_live_writer_in_the_same_process_is_refused_in_one_sentence(shm_name):
    with ShmWriter(shm_name, 8, 8):
        with pytest.raises(ShmInUseError) as refused:
            ShmWriter(shm_name, 8, 8)
    message = str(refused.value)
    assert message.count(".") == 1 and message.endswith("choose another name.")


def test_size_and_format_change_reaches_the_reader_as_a_new_generation(shm_name):
    with ShmWriter(shm_name, 64, 48, "rgb") as writer, ShmReader(shm_name) as reader:
        writer.write(np.full((48, 64, 3), 10, np.uint8))
        small, small_meta = wait_for(reader.read)
        writer.write(np.full((80, 32, 4), 20, np.uint8), pixel_format="bgra")
        tall, tall_meta = wait_for(reader.read)
    assert small.shape == (48, 64, 3) and small_meta.pixel_format == "rgb"
    assert tall.shape == (80, 32, 4) and tall_meta.pixel_format == "bgra"
    assert np.all(tall == 20)
    assert tall_meta.generation > small_meta.generation


@needs_dev_shm
def test_writer_removes_a_replaced_frame_segment_and_everything_on_close(shm_name):
    with ShmWriter(shm_name, 16, 16, "rgb") as writer:
        writer.write(np.zeros((16, 16, 3), np.uint8))
        writer.write(np.zeros((8, 8, 3), np.uint8))
        segments = sorted(path.name for path in SHM_FOLDER.glob(f"{shm_name}*"))
        assert segments == [shm_name, frame_segment_name(shm_name, 2)]
    assert not list(SHM_FOLDER.glob(f"{shm_name}*"))


def test_reader_returns_each_frame_once_and_keeps_its_own_copy(shm_name):
    with ShmWriter(shm_name, 4, 4, "rgb") as writer, ShmReader(shm_name) as reader:
        writer.write(np.full((4, 4, 3), 1, np.uint8), capture_time=123.5)
        pixels, meta = wait_for(reader.read)
        assert reader.read() is None
        writer.write(np.full((4, 4, 3), 2, np.uint8))
        assert np.all(pixels == 1)
    assert meta.capture_time == 123.5 and meta.frame_counter == 1


def test_reader_started_before_the_writer_attaches_when_it_appears(shm_name):
    with ShmReader(shm_name) as reader:
        assert reader.read() is None and not reader.connected
        with ShmWriter(shm_name, 4, 4, "rgb") as writer:
            writer.write(np.full((4, 4, 3), 9, np.uint8))
            pixels, _ = wait_for(reader.read)
    assert np.all(pixels == 9)


def test_closed_writer_disconnects_readers_at_once_and_a_restart_is_picked_up(shm_name):
    with ShmReader(shm_name) as reader:
        writer = ShmWriter(shm_name, 4, 4, "rgb")
        writer.write(np.full((4, 4, 3), 1, np.uint8))
        wait_for(reader.read)
        writer.close()
        assert not reader.connected
        assert reader.read() is None
        with ShmWriter(shm_name, 4, 4, "rgb") as restarted:
            restarted.write(np.full((4, 4, 3), 2, np.uint8))
            pixels, _ = wait_for(reader.read)
    assert np.all(pixels == 2)


def test_idle_writer_stays_connected_through_its_heartbeat(shm_name):
    with ShmWriter(shm_name, 4, 4, "rgb") as writer, ShmReader(shm_name, stale_after=0.3) as reader:
        writer.write(np.zeros((4, 4, 3), np.uint8))
        time.sleep(0.6)
        assert reader.connected


def test_segment_of_another_program_is_refused_by_writer_and_reader(shm_name):
    foreign = shared_memory.SharedMemory(shm_name, create=True, size=4096)
    try:
        foreign.buf[:8] = b"NOTOURS!"
        with pytest.raises(ShmProtocolError, match="belongs to another program"):
            ShmWriter(shm_name, 4, 4)
        with ShmReader(shm_name) as reader, pytest.raises(ShmProtocolError, match="not a frame"):
            reader.read()
    finally:
        foreign.close()
        foreign.unlink()


@pytest.mark.parametrize("bad", ["", "has space", "-dash-first", "x" * 21, "a/b", "ünï"])
def test_invalid_names_are_refused_with_the_rule(bad):
    with pytest.raises(ValueError, match="1 to 20 characters"):
        validate_name(bad)


def test_pixels_of_the_wrong_shape_are_refused(shm_name):
    with ShmWriter(shm_name, 4, 4, "rgba") as writer:
        with pytest.raises(ValueError, match=r"shape \(height, width, 4\) for rgba"):
            writer.write(np.zeros((4, 4, 3), np.uint8))
        with pytest.raises(ValueError, match="uint8"):
            writer.write(np.zeros((4, 4, 4), np.float32))


def test_live_writer_of_another_protocol_version_is_refused_not_overwritten(shm_name):
    with ShmWriter(shm_name, 4, 4, "rgb"):
        index = shared_memory.SharedMemory(shm_name)
        struct.pack_into("<H", index.buf, 8, 2)  # as a version-2 writer would stamp it
        index.close()
        with pytest.raises(ShmInUseError):
            ShmWriter(shm_name, 4, 4)


def test_segment_left_half_created_is_taken_over(shm_name):
    leftover = shared_memory.SharedMemory(shm_name, create=True, size=4096)  # magic still zero
    leftover.close()
    with ShmWriter(shm_name, 4, 4, "rgb") as writer, ShmReader(shm_name) as reader:
        writer.write(np.full((4, 4, 3), 5, np.uint8))
        pixels, _ = wait_for(reader.read)
    assert np.all(pixels == 5)


def test_connected_from_another_thread_waits_while_the_reader_detaches(shm_name, peer):
    """A status line asks `connected` on the engine thread while the source thread may close the
    segment: the question waits for the close instead of reading a buffer being released."""
    with ShmWriter(shm_name, 32, 16, "rgba") as writer:
        writer.write(peer.make_frame(1, 16, 32))
        reader = ShmReader(shm_name)
        wait_for(reader.read)
        closing, release = threading.Event(), threading.Event()
        close_frames = reader._close_frames

        def slow_close_frames() -> None:
            closing.set()
            release.wait(30)
            close_frames()

        reader._close_frames = slow_close_frames
        answers: list[bool] = []
        closer = threading.Thread(target=reader.close)
        closer.start()
        assert closing.wait(30)
        asker = threading.Thread(target=lambda: answers.append(reader.connected))
        asker.start()
        asker.join(0.3)
        assert answers == []  # still waiting for the close to finish
        release.set()
        closer.join(30)
        asker.join(30)
        assert len(answers) == 1
        reader._close_frames = close_frames
        reader.close()
