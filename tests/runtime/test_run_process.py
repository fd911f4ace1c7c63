"""`sd-bridge run` as users start it: a real process, shm in and out, OSC, signals, exit codes."""

from __future__ import annotations

import re
import signal
import socket
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from bridge.control import OscClient
from bridge.io.shm_protocol import ShmReader, ShmWriter
from tests.runtime.helpers import first_answer, free_port

SIZE = ("--width", "64", "--height", "64")
TINY = ("--model", "synthetic:tiny", *SIZE)


def read_frames(reader: ShmReader, count: int, timeout: float, feed=None) -> list:
    frames = []
    deadline = time.monotonic() + timeout
    while len(frames) < count and time.monotonic() < deadline:
        if feed is not None:
            feed()
        got = reader.read()
        if got is not None:
            frames.append(got)
        time.sleep(0.005)
    return frames


def test_frames_written_to_shm_come_back_diffused_on_shm(bridge_process, shm_name):
    name_in, name_out = shm_name(), shm_name()
    port = free_port()
    writer = ShmWriter(name_in, 64, 64, "rgba")
    process = bridge_process(
        *TINY,
        "--input",
        f"shm:{name_in}",
        "--output",
        f"shm:{name_out}",
        "--osc-port",
        str(port),
        "--quiet",
    )
    rng = np.random.default_rng(0)
    sent = []

    def feed() -> None:
        pixels = rng.integers(0, 256, (64, 64, 4), dtype=np.uint8)
        capture = time.perf_counter()
        writer.write(pixels, capture_time=capture)
        sent.append(capture)

    reader = None
    deadline = time.monotonic() + 60
    while reader is None and time.monotonic() < deadline:
        feed()
        try:
            reader = ShmReader(name_out)
        except Exception:
            assert process.poll() is None, process.communicate()[1]
            time.sleep(0.05)
    frames = read_frames(reader, 5, 30, feed)
    reader.close()
    writer.close()
    assert len(frames) == 5
    pixels, meta = frames[-1]
    assert pixels.shape == (64, 64, 4) and meta.pixel_format == "rgba"
    assert meta.capture_time in sent  # the capture time travels with the frame
    assert (pixels[..., 3] == 255).all()


def test_osc_reaches_a_running_bridge_and_errors_come_back(bridge_process, shm_name):
    port = free_port()
    process = bridge_process(*TINY, "--output", "null", "--osc-port", str(port), "--quiet")
    with OscClient("127.0.0.1", port, timeout=1.0) as client:
        assert first_answer(client, process, "prompt") is not None
        client.send("/sd/prompt", "a lighthouse in a storm")
        assert client.get("prompt") == ["a lighthouse in a storm"]
        client.send("/sd/delta", float("nan"))
        error = client.receive(2.0)
        assert error is not None and error[0] == "/sd/error"
        assert error[1][0] == "/sd/delta"
        assert client.get("delta") == [1.0]


def test_sigterm_stops_cleanly_and_removes_the_output_segment(bridge_process, shm_name):
    name_out = shm_name()
    process = bridge_process(*TINY, "--output", f"shm:{name_out}", "--no-osc", "--quiet")
    deadline = time.monotonic() + 60
    reader = None
    while reader is None or reader.read() is None:  # running: frames are coming out
        assert time.monotonic() < deadline and process.poll() is None, process.communicate()[1]
        if reader is None and Path(f"/dev/shm/{name_out}").exists():
            reader = ShmReader(name_out)
        time.sleep(0.05)
    reader.close()
    # How fast it stops is measured by scripts/soak.py (its "quick stop" target), not here.
    process.send_signal(signal.SIGTERM)
    process.wait(timeout=60)
    assert process.returncode == 0
    assert not Path(f"/dev/shm/{name_out}").exists()
    assert not list(Path("/dev/shm").glob(f"{name_out}_*"))


def test_frames_option_stops_after_that_many_outputs(bridge_process, tmp_path):
    out = tmp_path / "frame_%03d.png"
    process = bridge_process(*TINY, "--output", f"file:{out}", "--frames", "4", "--no-osc")
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 0, stderr
    assert "stopped after 4 frames" in stderr
    # A recording gets every frame launched, the last one too, and nothing after it.
    written = sorted(path.name for path in tmp_path.glob("frame_*.png"))
    assert written == [f"frame_{index:03d}.png" for index in range(4)]


def test_a_port_in_use_is_one_sentence_and_exit_code_two(bridge_process):
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as taken:
        taken.bind(("127.0.0.1", 0))
        port = taken.getsockname()[1]
        process = bridge_process(*TINY, "--output", "null", "--osc-port", str(port))
        _, stderr = process.communicate(timeout=120)
    assert process.returncode == 2
    assert f"{port}" in stderr and "--osc-port" in stderr
    assert "Traceback" not in stderr


def test_a_missing_model_is_one_sentence_and_exit_code_two(bridge_process, tmp_path):
    missing = tmp_path / "no-such-model"
    process = bridge_process("--model", str(missing), *SIZE, "--output", "null", "--no-osc")
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 2
    assert str(missing) in stderr
    assert "Traceback" not in stderr


def test_a_bad_config_file_names_every_problem_and_starts_nothing(bridge_process, tmp_path):
    config = tmp_path / "bridge.toml"
    config.write_text('guidance = "loud"\ncolour = 3\nt_index = [32, 45]\n')
    process = bridge_process("--config", str(config), "--no-osc")
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 2
    assert f"{config}: guidance got 'loud'; use a float from 0.0 to 20.0." in stderr
    assert "unknown setting 'colour'" in stderr
    assert "Traceback" not in stderr


def test_the_command_line_overrides_the_config_file(bridge_process, tmp_path):
    config = tmp_path / "bridge.toml"
    config.write_text('model = "synthetic:tiny"\nwidth = 64\nheight = 64\nframes = 50\n')
    process = bridge_process(
        "--config", str(config), "--frames", "2", "--output", "null", "--no-osc"
    )
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 0, stderr
    assert "stopped after 2 frames" in stderr


def test_pattern_to_an_mp4_file_gives_that_many_frames_of_the_requested_size(
    bridge_process, tmp_path
):
    import av

    out = tmp_path / "out.mp4"
    process = bridge_process(
        "--model",
        "synthetic:tiny",
        "--width",
        "96",
        "--height",
        "64",
        "--output",
        f"file:{out}",
        "--frames",
        "20",
        "--no-osc",
    )
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 0, stderr
    with av.open(str(out)) as container:
        frames = list(container.decode(video=0))
    assert len(frames) == 20
    assert (frames[0].width, frames[0].height) == (96, 64)


def test_a_video_file_goes_through_to_a_reader_in_another_process(
    bridge_process, shm_name, tmp_path
):
    import av

    clip = tmp_path / "in.mp4"
    with av.open(str(clip), "w") as container:
        stream = container.add_stream("mpeg4", rate=30)
        stream.width, stream.height, stream.pix_fmt = 64, 64, "yuv420p"
        for index in range(30):
            image = np.full((64, 64, 3), index * 8, np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    name = shm_name()
    process = bridge_process(
        *TINY, "--input", f"file:{clip}", "--output", f"shm:{name}", "--no-osc", "--quiet"
    )
    reader_code = (
        "import sys, time\n"
        "from bridge.io.shm_protocol import ShmReader\n"
        "deadline = time.monotonic() + 90\n"
        "reader = None\n"
        "while reader is None:\n"
        "    try:\n"
        "        reader = ShmReader(sys.argv[1])\n"
        "    except Exception:\n"
        "        assert time.monotonic() < deadline\n"
        "        time.sleep(0.05)\n"
        "got = 0\n"
        "while got < 10 and time.monotonic() < deadline:\n"
        "    frame = reader.read()\n"
        "    if frame is not None:\n"
        "        got += 1\n"
        "        assert frame[0].shape == (64, 64, 3), frame[0].shape\n"
        "    time.sleep(0.005)\n"
        "print('frames', got)\n"
    )
    import subprocess
    import sys

    reader = subprocess.run(
        [sys.executable, "-c", reader_code, name], capture_output=True, text=True, timeout=120
    )
    assert process.poll() is None, process.communicate()[1]
    assert reader.returncode == 0, reader.stderr
    assert "frames 10" in reader.stdout


def test_a_second_bridge_on_the_same_shm_output_is_refused_with_exit_code_two(
    bridge_process, shm_name
):
    name = shm_name()
    first = bridge_process(*TINY, "--output", f"shm:{name}", "--no-osc", "--quiet")
    deadline = time.monotonic() + 60
    while not Path(f"/dev/shm/{name}").exists():
        assert time.monotonic() < deadline and first.poll() is None, first.communicate()[1]
        time.sleep(0.05)
    second = bridge_process(*TINY, "--output", f"shm:{name}", "--no-osc")
    _, stderr = second.communicate(timeout=120)
    assert second.returncode == 2
    assert name in stderr and "Traceback" not in stderr
    assert first.poll() is None  # the first one is unharmed


def test_bad_uris_are_one_sentence_and_exit_code_two(bridge_process, tmp_path):
    cases = [
        (("--input", "rtsp:stage"), "ndi"),
        (("--input", f"file:{tmp_path / 'missing.mp4'}"), "missing.mp4"),
        (("--input", "cam:7"), "7"),
        (("--output", "pattern:bars"), "pattern"),
    ]
    for arguments, named in cases:
        process = bridge_process(*TINY, *arguments, "--no-osc")
        _, stderr = process.communicate(timeout=120)
        assert process.returncode == 2, (arguments, stderr)
        assert named in stderr and "Traceback" not in stderr, stderr
        assert len(stderr.strip().splitlines()) <= 2, stderr


def test_sd_quit_over_osc_stops_the_bridge_cleanly(bridge_process, shm_name):
    port = free_port()
    name = shm_name()
    process = bridge_process(*TINY, "--output", f"shm:{name}", "--osc-port", str(port), "--quiet")
    with OscClient("127.0.0.1", port, timeout=1.0) as client:
        deadline = time.monotonic() + 60
        while True:
            assert time.monotonic() < deadline and process.poll() is None
            client.send("/sd/get", "seed")
            if client.receive(0.2) is not None:
                break
        client.send("/sd/quit", 1)
        error = client.receive(2.0)
        while error is not None and error[0] == "/sd/value":  # a late answer to a /sd/get
            error = client.receive(2.0)
        assert error is not None and error[0] == "/sd/error"
        assert process.poll() is None  # a malformed quit is refused, not obeyed
        client.send("/sd/quit")
        process.wait(timeout=60)  # how fast it stops is a soak target, not this test's
    assert process.returncode == 0
    assert not Path(f"/dev/shm/{name}").exists()


def test_after_a_sigkill_the_next_start_takes_over_the_left_segments(bridge_process, shm_name):
    name = shm_name()
    first = bridge_process(*TINY, "--output", f"shm:{name}", "--no-osc", "--quiet")
    deadline = time.monotonic() + 60
    while not Path(f"/dev/shm/{name}").exists():
        assert time.monotonic() < deadline and first.poll() is None, first.communicate()[1]
        time.sleep(0.05)
    first.send_signal(signal.SIGKILL)
    first.wait(10)
    assert Path(f"/dev/shm/{name}").exists()  # what the killed process left behind
    second = bridge_process(*TINY, "--output", f"shm:{name}", "--no-osc", "--quiet")
    reader = None
    deadline = time.monotonic() + 60
    while reader is None or reader.read() is None:
        assert time.monotonic() < deadline and second.poll() is None, second.communicate()[1]
        try:
            reader = reader or ShmReader(name)
        except Exception:
            reader = None
        time.sleep(0.05)
    reader.close()


@pytest.mark.slow
def test_sigint_with_a_file_output_writes_every_frame_it_counts(bridge_process, tmp_path):
    import av

    out = tmp_path / "out.mp4"
    process = bridge_process(*TINY, "--input", "pattern:", "--output", f"file:{out}", "--no-osc")
    deadline = time.monotonic() + 120
    while not out.exists():  # the file appears with the first frame
        assert time.monotonic() < deadline and process.poll() is None, process.communicate()[1]
        time.sleep(0.05)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 0, stderr
    printed = int(re.search(r"stopped after (\d+) frames", stderr).group(1))
    with av.open(str(out)) as container:
        written = len(list(container.decode(video=0)))
    assert printed >= 1
    assert written == printed


@pytest.mark.slow
def test_an_shm_input_says_once_that_it_waits_and_once_that_frames_arrive(bridge_process, shm_name):
    name = shm_name()
    process = bridge_process(
        *TINY, "--input", f"shm:{name}", "--output", "null", "--osc-port", str(free_port())
    )
    waiting = f"waiting for input shm:{name}"
    lines: list[str] = []
    deadline = time.monotonic() + 120
    while not any(waiting in line for line in lines):  # no writer yet: it says so
        assert time.monotonic() < deadline and process.poll() is None, lines
        lines.append(process.stderr.readline())
    writer = ShmWriter(name, 64, 64, "rgba")
    feeding = threading.Event()
    feeding.set()

    def feed() -> None:
        frame = np.zeros((64, 64, 4), np.uint8)
        while feeding.is_set():
            writer.write(frame)
            time.sleep(0.02)

    feeder = threading.Thread(target=feed, daemon=True)
    feeder.start()
    try:
        while not any("delivers frames" in line for line in lines):
            assert time.monotonic() < deadline and process.poll() is None, lines
            lines.append(process.stderr.readline())
        process.send_signal(signal.SIGTERM)
        _, rest = process.communicate(timeout=60)
    finally:
        feeding.clear()
        feeder.join(10)
        writer.close()
    lines.extend(rest.splitlines())
    assert process.returncode == 0
    assert sum(waiting in line for line in lines) == 1, lines
    assert sum("delivers frames" in line for line in lines) == 1, lines
    assert not [line for line in lines if "is gone" in line or "Traceback" in line], lines
