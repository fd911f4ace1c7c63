"""`sd-bridge run` as users start it: a real process, shm in and out, OSC, signals, exit codes."""

from __future__ import annotations

import signal
import socket
import time
from pathlib import Path

import numpy as np

from bridge.control import OscClient
from bridge.io.shm_protocol import ShmReader, ShmWriter

SIZE = ("--width", "64", "--height", "64")
TINY = ("--model", "synthetic:tiny", *SIZE)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


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
        deadline = time.monotonic() + 60
        reply = None
        while reply is None and time.monotonic() < deadline:
            assert process.poll() is None, process.communicate()[1]
            client.send("/sd/get", "prompt")
            reply = client.receive(0.2)
        client.send("/sd/prompt", "a lighthouse in a storm")
        assert client.get("prompt") == ["a lighthouse in a storm"]
        client.send("/sd/delta", float("nan"))
        error = client.receive(2.0)
        assert error is not None and error[0] == "/sd/error"
        assert error[1][0] == "/sd/delta"
        assert client.get("delta") == [1.0]


def test_sigterm_stops_within_two_seconds_and_removes_the_output_segment(bridge_process, shm_name):
    name_out = shm_name()
    process = bridge_process(*TINY, "--output", f"shm:{name_out}", "--no-osc", "--quiet")
    deadline = time.monotonic() + 60
    while not Path(f"/dev/shm/{name_out}").exists():
        assert time.monotonic() < deadline and process.poll() is None, process.communicate()[1]
        time.sleep(0.05)
    time.sleep(0.5)
    process.send_signal(signal.SIGTERM)
    started = time.monotonic()
    process.wait(timeout=10)
    assert time.monotonic() - started < 2.0
    assert process.returncode == 0
    assert not Path(f"/dev/shm/{name_out}").exists()
    assert not list(Path("/dev/shm").glob(f"{name_out}_*"))


def test_frames_option_stops_after_that_many_outputs(bridge_process, tmp_path):
    out = tmp_path / "frame_%03d.png"
    process = bridge_process(*TINY, "--output", f"file:{out}", "--frames", "4", "--no-osc")
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 0, stderr
    assert "stopped after 4 frames" in stderr
    assert len(list(tmp_path.glob("frame_*.png"))) >= 3


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
    assert "guidance must be a number, got 'loud'" in stderr
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
