"""The plugins' process supervisor (toe/sdb_supervisor.py, copied into plugins/obs/), with real
children: short Python programs that behave as a bridge can (finish on Ctrl+C, ignore it, fail
at start, outlive their host), so each case is quick and certain."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import sdb_supervisor

from tests.plugins.helpers import OBS_PLUGIN, ROOT, TOE

POSIX_ONLY = pytest.mark.skipif(sys.platform == "win32", reason="signals and ps: macOS and Linux")


def test_both_plugins_carry_the_same_supervisor() -> None:
    source = (TOE / "sdb_supervisor.py").read_bytes()
    assert (OBS_PLUGIN / "sdb_supervisor.py").read_bytes() == source, (
        "plugins/obs/sdb_supervisor.py differs from toe/sdb_supervisor.py; copy the toe/ one over"
    )


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
import os, signal, time
signal.signal(signal.SIGINT, signal.SIG_IGN)
print("running", os.getpid(), flush=True)
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

WRITES_NUL_BYTES = """
import sys
sys.stdout.buffer.write(b"sd-bridge: the output\\x00\\x00 is gone; pick\\x1b[2J another.\\n")
sys.exit(3)
"""


def wait_for(process: sdb_supervisor.BridgeProcess, running: bool, timeout: float = 20.0):
    deadline = time.monotonic() + timeout
    while (state := process.poll()).running != running:
        assert time.monotonic() < deadline, f"the child did not reach running={running}"
        time.sleep(0.02)
    return state


def wait_for_log(path: Path, text: str, timeout: float = 20.0) -> str:
    deadline = time.monotonic() + timeout
    while text not in (content := path.read_text() if path.exists() else ""):
        assert time.monotonic() < deadline, f"{text!r} never reached {path}"
        time.sleep(0.02)
    return content


def bridge_pid_in(log: Path) -> int:
    """The process id a stand-in bridge printed on its `running` line."""
    content = wait_for_log(log, "\n", timeout=20.0)
    deadline = time.monotonic() + 20.0
    while not (found := re.search(r"running (\d+)\n", content)):
        assert time.monotonic() < deadline, f"no running line in {log}"
        time.sleep(0.02)
        content = log.read_text()
    return int(found.group(1))


def is_gone(pid: int, timeout: float = 20.0) -> bool:
    """Whether process `pid` ends (or is a zombie) within `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        state = subprocess.run(
            ["ps", "-o", "stat=", "-p", str(pid)], capture_output=True, text=True, check=False
        )
        if state.stdout.strip().startswith("Z") or not state.stdout.strip():
            return True
        time.sleep(0.05)
    return False


@POSIX_ONLY
def test_stop_lets_the_child_finish_cleanly_and_reports_stopped(tmp_path: Path) -> None:
    process = sdb_supervisor.BridgeProcess(tmp_path / "bridge.log")
    process.start(child(FINISHES_ON_CTRL_C))
    assert process.poll().text == f"running (pid {process.pid})"
    wait_for_log(process.log_path, "running")
    process.stop()
    assert process.poll().text.startswith("stopping")
    assert wait_for(process, running=False).text == "stopped"
    assert "closed outputs" in process.log_path.read_text()


@POSIX_ONLY
def test_a_child_that_ignores_the_stop_request_is_killed_after_the_grace(tmp_path: Path) -> None:
    process = sdb_supervisor.BridgeProcess(tmp_path / "bridge.log", grace=0.3)
    process.start(child(IGNORES_CTRL_C))
    bridge_pid = bridge_pid_in(process.log_path)
    process.stop()
    assert wait_for(process, running=False).text == "stopped"
    assert is_gone(bridge_pid)


def test_a_bridge_that_fails_at_start_shows_its_error_sentence_unwrapped(
    tmp_path: Path,
) -> None:
    process = sdb_supervisor.BridgeProcess(tmp_path / "bridge.log")
    process.start(child(FAILS_AT_START))
    state = wait_for(process, running=False)
    assert state.text == (
        "exited with code 2: No model synthetic:huge was found; use synthetic:tiny or a folder."
    )


def test_without_an_error_sentence_the_last_line_tells(tmp_path: Path) -> None:
    process = sdb_supervisor.BridgeProcess(tmp_path / "bridge.log")
    process.start(child(CRASHES))
    assert wait_for(process, running=False).text == "exited with code 1: the last line"


def test_control_characters_in_the_log_never_reach_the_status(tmp_path: Path) -> None:
    process = sdb_supervisor.BridgeProcess(tmp_path / "bridge.log")
    process.start(child(WRITES_NUL_BYTES))
    text = wait_for(process, running=False).text
    assert text == "exited with code 3: the output is gone; pick[2J another."
    assert text.isprintable()


@POSIX_ONLY
def test_stop_and_wait_returns_only_when_the_child_is_gone(tmp_path: Path) -> None:
    process = sdb_supervisor.BridgeProcess(tmp_path / "bridge.log", grace=0.3)
    process.start(child(IGNORES_CTRL_C))
    bridge_pid = bridge_pid_in(process.log_path)
    process.stop_and_wait()
    assert process.pid is None
    assert process.poll() == sdb_supervisor.ProcessState(False, "stopped")
    assert is_gone(bridge_pid)


def test_starting_twice_is_refused_while_the_first_runs(tmp_path: Path) -> None:
    process = sdb_supervisor.BridgeProcess(tmp_path / "bridge.log", grace=0.3)
    process.start(child(IGNORES_CTRL_C))
    try:
        with pytest.raises(sdb_supervisor.BridgeError, match="already running; stop it"):
            process.start(child(IGNORES_CTRL_C))
    finally:
        process.stop_and_wait()


def test_a_missing_python_is_named_with_the_fix(tmp_path: Path) -> None:
    process = sdb_supervisor.BridgeProcess(tmp_path / "bridge.log")
    with pytest.raises(RuntimeError, match="'/no/such/python' was not found; set it"):
        process.start(["/no/such/python", "-m", "bridge.cli", "run"])
    assert process.poll() == sdb_supervisor.ProcessState(False, "stopped")


HOST = """
import sys
sys.path.insert(0, sys.argv[1])
import sdb_supervisor
process = sdb_supervisor.BridgeProcess(sys.argv[2], pid_path=sys.argv[3], grace=0.5)
process.start([sys.executable, "-c", sys.argv[4]])
print("started", flush=True)
sys.stdin.read()
"""


@POSIX_ONLY
def test_the_bridge_dies_with_its_killed_host(tmp_path: Path) -> None:
    log, record = tmp_path / "bridge.log", tmp_path / "osc7000.pid"
    host = subprocess.Popen(
        [sys.executable, "-c", HOST, str(TOE), str(log), str(record), IGNORES_CTRL_C],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    try:
        assert host.stdout is not None and host.stdout.readline() == "started\n"
        bridge_pid = bridge_pid_in(log)
        watchdog_pid = int(record.read_text().split()[0])
        host.kill()  # as when OBS or TouchDesigner is killed: no unload, no stop
        host.wait(10)
        assert is_gone(bridge_pid), "the bridge outlived its host"
        assert is_gone(watchdog_pid)
    finally:
        if host.poll() is None:
            host.kill()
        host.wait(10)


@POSIX_ONLY
def test_a_start_stops_the_bridge_an_earlier_host_left_behind(tmp_path: Path) -> None:
    record = tmp_path / "osc7000.pid"
    earlier = sdb_supervisor.BridgeProcess(tmp_path / "earlier.log", pid_path=record, grace=0.3)
    earlier.start(child(IGNORES_CTRL_C))  # its host hangs: the pipe stays open
    left_pid = bridge_pid_in(earlier.log_path)
    later = sdb_supervisor.BridgeProcess(tmp_path / "later.log", pid_path=record, grace=0.3)
    try:
        later.start(child(FINISHES_ON_CTRL_C))
        assert is_gone(left_pid)
        assert record.read_text().split()[0] == str(later.pid)
        assert not wait_for(earlier, running=False).running
    finally:
        later.stop_and_wait()
        earlier.stop_and_wait()
    assert not record.exists()


@POSIX_ONLY
def test_a_record_of_another_process_is_dropped_without_touching_it(tmp_path: Path) -> None:
    record = tmp_path / "osc7000.pid"
    record.write_text(f"{os.getpid()} sd-bridge-watchdog-0123\n")
    assert sdb_supervisor.stop_left_behind(record) is False
    assert not record.exists()
    os.kill(os.getpid(), 0)  # still here
    assert signal.getsignal(signal.SIGINT) is not None
