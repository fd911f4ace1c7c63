"""ndi: for real, against an independent NDI sender or receiver in another process.

The peer (tests/io/ndi_peer.py) uses NDIlib alone. NDI compresses video (SpeedHQ), so pixels are
compared with a tolerance. Every wait is bounded: a test fails, never hangs, if NDI misbehaves.
"""

from __future__ import annotations

import importlib.util
import itertools
import json
import os
import re
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("NDIlib", reason="ndi-python is not installed; pip install -e .[dev]")

from bridge.io import Frame, now, open_sink, open_source  # noqa: E402
from bridge.io.ndi import list_sources  # noqa: E402

PEER_SCRIPT = Path(__file__).with_name("ndi_peer.py")
TOLERANCE = 12  # per channel, after SpeedHQ compression of a solid frame
_names = itertools.count()


def load_peer():
    spec = importlib.util.spec_from_file_location("ndi_peer", PEER_SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


peer = load_peer()


@pytest.fixture
def ndi_name() -> str:
    """An NDI name no other test uses."""
    return f"sdb-test-{os.getpid()}-{next(_names)}"


def start_sender(start_ndi_peer, name, four_cc="BGRA", *, size=(64, 48), seconds=20.0, base=0):
    process = start_ndi_peer("sender", name, *size, 30, four_cc, seconds, base)
    assert process.stdout.readline().strip() == "ready", process.communicate(timeout=10)[1]
    return process


def sent_lines(process: subprocess.Popen) -> dict[int, float]:
    """Frame number -> capture time, for every frame a sender printed, after it is stopped."""
    if process.poll() is None:
        process.kill()
    process.wait(timeout=10)
    output = process.stdout.read()  # through the buffer that read "ready"
    sent = {}
    for line in output.splitlines():
        _, number, capture = line.split()
        sent[int(number)] = float(capture)
    return sent


def read_frames(source, count: int, seconds: float) -> list[Frame]:
    frames: list[Frame] = []
    deadline = time.monotonic() + seconds
    while len(frames) < count and time.monotonic() < deadline:
        frame = source.read(timeout=0.2)
        if frame is not None:
            frames.append(frame)
    return frames


def centre_rgb(frame: Frame) -> np.ndarray:
    pixel = frame.to("rgb").pixels[frame.height // 2, frame.width // 2]
    return pixel.astype(int)


def close_to(actual, expected) -> bool:
    return bool(np.all(np.abs(np.asarray(actual, int) - np.asarray(expected, int)) <= TOLERANCE))


def test_an_ndi_sink_reaches_an_independent_receiver_with_size_content_and_capture_time(
    start_ndi_peer, ndi_name
):
    receiver = start_ndi_peer("receiver", ndi_name, 10, 20)
    sent: dict[float, int] = {}
    with open_sink(f"ndi:{ndi_name}", width=96, height=64, fps=60) as sink:
        deadline = time.monotonic() + 20
        n = 0
        while receiver.poll() is None and time.monotonic() < deadline:
            capture = now()
            pixels = np.full((64, 96, 3), peer.colour(n), np.uint8)
            sink.write(Frame(pixels, "rgb", capture, n))
            sent[round(capture, 6)] = n
            n += 1
        output, errors = receiver.communicate(timeout=10)
    assert receiver.returncode == 0, errors
    report = json.loads(output)
    assert report["url"].startswith("127.0.0.1:")
    frames = report["frames"]
    assert len(frames) == 10
    numbers = []
    for frame in frames:
        assert frame["size"] == [96, 64] and frame["four_cc"] == "RGBX"
        capture = float(re.search(r'capture_time="([0-9.]+)"', frame["metadata"]).group(1))
        number = sent[round(capture, 6)]  # the capture time travelled with its frame
        assert close_to(frame["rgb"], peer.colour(number))
        numbers.append(number)
    assert numbers == sorted(numbers) and len(set(numbers)) == 10  # in order, each new
    assert len({tuple(frame["rgb"]) for frame in frames}) > 1  # the content changes


@pytest.mark.parametrize("four_cc", ["BGRA", "BGRX", "RGBA", "UYVY"])
def test_a_source_takes_each_four_cc_an_independent_sender_sends(start_ndi_peer, ndi_name, four_cc):
    sender = start_sender(start_ndi_peer, ndi_name, four_cc)
    with open_source(f"ndi:{ndi_name}", width=64, height=48) as source:
        frames = read_frames(source, 5, 15)
        assert source.connected
    sent = sent_lines(sender)
    assert len(frames) == 5
    by_capture = {round(capture, 6): number for number, capture in sent.items()}
    numbers = [by_capture.get(round(frame.capture_time, 6)) for frame in frames]
    assert None not in numbers, (numbers, [frame.capture_time for frame in frames], sent)
    assert numbers == sorted(numbers) and len(set(numbers)) == 5
    for frame, number in zip(frames, numbers, strict=True):
        assert frame.pixels.shape[:2] == (48, 64)
        assert frame.pixel_format == ("rgba" if four_cc in ("BGRA", "RGBA") else "rgb")
        if four_cc == "UYVY":
            expected = (peer.grey_as_rgb(peer.grey(number)),) * 3
        else:
            expected = peer.colour(number)
        assert close_to(centre_rgb(frame), expected), (four_cc, number, centre_rgb(frame))


def test_a_source_at_a_direct_address_receives_and_preview_bandwidth_is_smaller(
    start_ndi_peer, ndi_name
):
    start_sender(start_ndi_peer, ndi_name, "BGRX", size=(1280, 720))
    found = []
    deadline = time.monotonic() + 10
    while not found and time.monotonic() < deadline:
        found = [url for name, url in list_sources(0.3) if name.endswith(f"({ndi_name})")]
    assert found, "the sender was not listed"
    url = found[0]
    with open_source(f"ndi:x?url={url}", width=64, height=36) as full:
        assert len(read_frames(full, 2, 15)) == 2
        assert full.received_size == (1280, 720)
    with open_source(f"ndi:x?url={url}&bandwidth=lowest", width=64, height=36) as preview:
        frames = read_frames(preview, 2, 15)
        assert len(frames) == 2 and frames[0].pixels.shape[:2] == (36, 64)
        width, height = preview.received_size
        assert width < 1280 and height < 720


def test_a_source_waits_through_the_loss_of_its_sender_and_takes_the_one_that_returns(
    start_ndi_peer, ndi_name
):
    first = start_sender(start_ndi_peer, ndi_name, "BGRA", base=0)
    with open_source(f"ndi:{ndi_name}", width=64, height=48) as source:
        before = read_frames(source, 3, 15)
        assert len(before) == 3 and source.connected
        first.kill()
        first.communicate(timeout=10)
        # Gone: reads come back empty in bounded time, and the source says what it waits for.
        deadline = time.monotonic() + 10
        while source.read(timeout=0.2) is not None or source.connected:
            assert time.monotonic() < deadline, "the source did not notice its sender went"
        assert "waiting for an NDI sender named" in source.describe()
        assert source.read(timeout=0.5) is None
        second = start_sender(start_ndi_peer, ndi_name, "BGRA", base=100)
        after = read_frames(source, 3, 20)
        assert len(after) == 3 and source.connected
    sent = sent_lines(second)
    returned = {round(capture, 6) for number, capture in sent.items() if number >= 100}
    assert all(round(frame.capture_time, 6) in returned for frame in after)
    for frame in after:
        numbers = [n for n, c in sent.items() if round(c, 6) == round(frame.capture_time, 6)]
        assert close_to(centre_rgb(frame), peer.colour(numbers[0]))


@pytest.mark.slow
def test_list_shows_the_sender_and_doctor_says_the_runtime_loaded(start_ndi_peer, ndi_name, capsys):
    from bridge.cli import main

    start_sender(start_ndi_peer, ndi_name, "BGRA")
    deadline = time.monotonic() + 10
    listed = ""
    while f"ndi:{ndi_name}" not in listed and time.monotonic() < deadline:
        assert main(["list"]) == 0
        listed = capsys.readouterr().out
    assert f"ndi:{ndi_name} " in listed and "127.0.0.1:" in listed
    assert "  yes ndi " in listed
    assert main(["doctor"]) == 0
    doctor = capsys.readouterr().out
    assert re.search(r"^ndi +runtime NDI SDK .* loaded$", doctor, re.MULTILINE)


def test_a_name_nobody_sends_is_reported_once_and_reads_stay_empty(monkeypatch, caplog):
    import bridge.io.ndi as ndi_module

    monkeypatch.setattr(ndi_module, "NOT_FOUND_AFTER", 0.3)
    with open_source("ndi:nobody-sends-this", width=8, height=8) as source:
        reads = [source.read(timeout=0.2) for _ in range(5)]
        described = source.describe()
    assert reads == [None] * 5
    assert "waiting for an NDI sender named 'nobody-sends-this'" in described
    warnings = [r.getMessage() for r in caplog.records if r.name == "bridge.io.ndi"]
    assert len(warnings) == 1
    assert warnings[0].startswith("No NDI sender named 'nobody-sends-this' was found in 0.3 s")
    assert "ndi:nobody-sends-this?url=<host>:<port>" in warnings[0]


def test_the_ips_option_names_hosts_to_ask_besides_this_one():
    with open_source("ndi:td?ips=10.0.0.7,10.0.0.8", width=8, height=8) as source:
        assert source.extra_ips == ("127.0.0.1", "10.0.0.7", "10.0.0.8")
