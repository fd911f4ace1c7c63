"""Launching and stopping the bridge from the component (toe/sdb_process.py), with real children.

The command line is checked by the bridge's own argument parser and settings; the process
handling runs real child processes: short Python programs that behave as a bridge can (finish
on Ctrl+C, ignore it, fail at start), so each case is quick and certain.
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import sdb_process

from bridge.control import OscClient, ParamStore
from bridge.io.shm_protocol import validate_name
from tests.plugins.helpers import free_udp_port, parsed_run_settings

SETTINGS = sdb_process.BridgeSettings(
    python=sys.executable,
    input_uri="shm:stage-in",
    output_uri="shm:stage-out",
    model="synthetic:tiny",
    width=64,
    height=96,
    tiny_vae=False,
    accel="none",
    osc_port=7100,
    feedback_port=7101,
    prompt="-a forest, oil on canvas",
    negative_prompt="blurry",
    t_index=[20, 35, 45],
    cfg="full",
    guidance=1.5,
    delta=0.6,
    seed=42,
    filter_enable=True,
    filter_threshold=0.9,
    filter_max_skip=4,
)


def test_the_command_line_is_read_by_the_bridge_as_the_settings_say() -> None:
    run = parsed_run_settings(sdb_process.bridge_command(SETTINGS))
    assert run.input == "shm:stage-in"
    assert run.output == ["shm:stage-out"]
    assert (run.model, run.vae, run.accel) == ("synthetic:tiny", "model", "none")
    assert (run.width, run.height) == (64, 96)
    assert (run.osc_host, run.osc_port, run.osc_feedback) == ("127.0.0.1", 7100, ["127.0.0.1:7101"])
    assert run.prompt == "-a forest, oil on canvas"
    assert run.negative_prompt == "blurry"
    assert run.t_index == [20, 35, 45]
    assert (run.cfg, run.guidance, run.delta, run.seed) == ("full", 1.5, 0.6, 42)
    assert (run.filter, run.filter_threshold, run.filter_max_skip) == (True, 0.9, 4)
    ParamStore(run.store_values())  # the values pass the bridge's own validation


def test_a_filter_that_is_off_and_an_empty_negative_prompt_add_no_flags() -> None:
    settings = replace(SETTINGS, filter_enable=False, negative_prompt="", tiny_vae=True)
    command = sdb_process.bridge_command(settings)
    assert "--filter" not in command
    assert not any(part.startswith("--negative-prompt") for part in command)
    run = parsed_run_settings(command)
    assert (run.filter, run.negative_prompt, run.vae) == (False, "", "tiny")


def test_auto_transport_is_spout_on_windows_and_shared_memory_elsewhere() -> None:
    assert sdb_process.resolve_transport("auto", "win32") == "spout"
    assert sdb_process.resolve_transport("auto", "darwin") == "shm"
    assert sdb_process.resolve_transport("auto", "linux") == "shm"
    assert sdb_process.resolve_transport("shm", "win32") == "shm"
    with pytest.raises(ValueError, match="pick one of auto, spout, shm"):
        sdb_process.resolve_transport("ndi")


def test_stream_names_give_uris_whose_shared_memory_names_are_valid() -> None:
    input_uri, output_uri = sdb_process.stream_uris("shm", "a" * 16)
    assert (input_uri, output_uri) == (f"shm:{'a' * 16}-in", f"shm:{'a' * 16}-out")
    for uri in (input_uri, output_uri):
        validate_name(uri.split(":", 1)[1])
    assert sdb_process.stream_uris("spout", "td") == ("spout:td-in", "spout:td-out")


@pytest.mark.parametrize("name", ["", "a" * 17, "-leading", "has space", "dot.ted"])
def test_stream_names_that_would_break_the_uris_are_refused(name: str) -> None:
    with pytest.raises(ValueError, match="1 to 16 characters"):
        sdb_process.stream_uris("shm", name)


def child(code: str) -> list[str]:
    """A command running `code` in a fresh Python: a stand-in for the bridge's process."""
    return [sys.executable, "-c", code]


FINISHES_ON_CTRL_C = """
import signal, sys, time
def stop(*_):
    print("closed outputs", flush=True)
    sys.exit(0)
signal.signal(signal.SIGINT, stop)
print("running", flush=True)
while True:
    time.sleep(0.05)
"""

IGNORES_CTRL_C = """
import signal, time
signal.signal(signal.SIGINT, signal.SIG_IGN)
print("running", flush=True)
while True:
    time.sleep(0.05)
"""

FAILS_AT_START = """
import sys
print("loading model", flush=True)
print("sd-bridge: No model synthetic:huge was found; use synthetic:tiny", file=sys.stderr)
print("or a folder.", file=sys.stderr, flush=True)
sys.exit(2)
"""

CRASHES = """
raise SystemExit("the last line")
"""


def wait_for(process: sdb_process.BridgeProcess, running: bool, timeout: float = 10.0):
    deadline = time.monotonic() + timeout
    while (state := process.poll()).running != running:
        assert time.monotonic() < deadline, f"the child did not reach running={running}"
        time.sleep(0.02)
    return state


def wait_for_log(path: Path, text: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while text not in (path.read_text() if path.exists() else ""):
        assert time.monotonic() < deadline, f"{text!r} never reached {path}"
        time.sleep(0.02)


@pytest.mark.skipif(sys.platform == "win32", reason="Ctrl+C reaches no child on Windows")
def test_stop_lets_the_child_finish_cleanly_and_reports_stopped(tmp_path: Path) -> None:
    process = sdb_process.BridgeProcess(tmp_path / "bridge.log")
    process.start(child(FINISHES_ON_CTRL_C))
    assert process.poll().text == f"running (pid {process.pid})"
    wait_for_log(process.log_path, "running")
    process.stop()
    assert process.poll().text.startswith("stopping")
    assert wait_for(process, running=False).text == "stopped"
    assert "closed outputs" in process.log_path.read_text()


def test_a_child_that_ignores_the_stop_request_is_killed_after_the_grace(tmp_path: Path) -> None:
    process = sdb_process.BridgeProcess(tmp_path / "bridge.log", grace=0.3)
    process.start(child(IGNORES_CTRL_C))
    wait_for_log(process.log_path, "running")
    pid = process.pid
    started = time.monotonic()
    process.stop()
    assert wait_for(process, running=False).text == "stopped"
    assert 0.25 <= time.monotonic() - started < 5.0
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


def test_a_bridge_that_fails_at_start_shows_its_error_sentence_unwrapped(
    tmp_path: Path,
) -> None:
    process = sdb_process.BridgeProcess(tmp_path / "bridge.log")
    process.start(child(FAILS_AT_START))
    state = wait_for(process, running=False)
    assert state.text == (
        "exited with code 2: No model synthetic:huge was found; use synthetic:tiny or a folder."
    )


def test_without_an_error_sentence_the_last_line_tells(tmp_path: Path) -> None:
    process = sdb_process.BridgeProcess(tmp_path / "bridge.log")
    process.start(child(CRASHES))
    assert wait_for(process, running=False).text == "exited with code 1: the last line"


def test_stop_and_wait_returns_only_when_the_child_is_gone(tmp_path: Path) -> None:
    process = sdb_process.BridgeProcess(tmp_path / "bridge.log", grace=0.3)
    process.start(child(IGNORES_CTRL_C))
    wait_for_log(process.log_path, "running")
    process.stop_and_wait()
    assert process.pid is None
    assert process.poll() == sdb_process.ProcessState(False, "stopped")


def test_starting_twice_is_refused_while_the_first_runs(tmp_path: Path) -> None:
    process = sdb_process.BridgeProcess(tmp_path / "bridge.log", grace=0.3)
    process.start(child(IGNORES_CTRL_C))
    try:
        with pytest.raises(sdb_process.BridgeError, match="already running; stop it"):
            process.start(child(IGNORES_CTRL_C))
    finally:
        process.stop_and_wait()


def test_a_missing_python_is_named_with_the_fix(tmp_path: Path) -> None:
    process = sdb_process.BridgeProcess(tmp_path / "bridge.log")
    with pytest.raises(sdb_process.BridgeError, match="'/no/such/python' was not found; set it"):
        process.start(["/no/such/python", "-m", "bridge.cli", "run"])
    assert process.poll() == sdb_process.ProcessState(False, "stopped")


@pytest.mark.slow
def test_the_real_bridge_starts_with_the_command_line_and_stops_on_request(
    bridge_python: str, tmp_path: Path
) -> None:
    settings = replace(
        SETTINGS,
        python=bridge_python,
        input_uri="pattern:bars",
        output_uri="null",
        t_index=[32, 45],
        cfg="self",
        osc_port=free_udp_port(),
        feedback_port=free_udp_port(),
    )
    process = sdb_process.BridgeProcess(tmp_path / "bridge.log")
    process.start(sdb_process.bridge_command(settings))
    with OscClient("127.0.0.1", settings.osc_port, timeout=0.5) as client:
        deadline = time.monotonic() + 60
        while True:
            assert process.poll().running, process.poll().text
            try:
                assert client.get("/sd/prompt") == ["-a forest, oil on canvas"]
                break
            except TimeoutError:
                assert time.monotonic() < deadline, "the bridge never answered /sd/get"
        assert client.get("/sd/delta") == [pytest.approx(0.6)]
    process.stop()
    assert wait_for(process, running=False, timeout=30).text == "stopped"
