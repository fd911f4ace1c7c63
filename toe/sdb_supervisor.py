"""Running `sd-bridge run` as a child of a host program that may die at any moment.

Standard library only, for the Pythons of TouchDesigner and OBS. The same file is both plugins'
supervisor: edit toe/sdb_supervisor.py and copy it over plugins/obs/sdb_supervisor.py;
tests/plugins/test_supervisor.py fails while the two differ.

The host never starts the bridge directly. It starts a small watchdog (`WATCHDOG`, run with
`python -c`) whose stdin is a pipe from the host; the watchdog starts the bridge. When the pipe
closes, because the host asked to stop or because the host died and the system closed its end,
the watchdog asks the bridge to finish (Ctrl+C; Windows has no console to deliver it to, so the
bridge is terminated there), kills it after the grace period and exits with its code. On
Windows the bridge also sits in a job object that kills it when the watchdog itself is killed.
A record of the watchdog (`pid_path`) lets the next start stop one that a crashed host left.
"""

import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

STOP_GRACE = 5.0
"""Seconds a stopping bridge gets to close its outputs before it is killed."""
ERROR_PREFIX = "sd-bridge:"
"""How the bridge starts the sentence it prints when it stops on an error."""
_KILL_MARGIN = 2.0
_LOG_TAIL_BYTES = 8192
_MARKER_PREFIX = "sd-bridge-watchdog-"

WATCHDOG = r"""
import os, signal, subprocess, sys, threading
grace, command = float(sys.argv[1]), sys.argv[3:]
if sys.platform != "win32":
    # Ctrl+C meant for the bridge may reach its whole process group; the watchdog stays.
    signal.signal(signal.SIGINT, lambda *_: None)
bridge = subprocess.Popen(command, stdin=subprocess.DEVNULL)
if sys.platform == "win32":
    try:  # a job object kills the bridge with the watchdog, however the watchdog ends
        import ctypes
        kernel32 = ctypes.windll.kernel32
        kernel32.CreateJobObjectW.restype = ctypes.c_void_p
        job = kernel32.CreateJobObjectW(None, None)
        limits = (ctypes.c_byte * 144)()  # JOBOBJECT_EXTENDED_LIMIT_INFORMATION on x64
        ctypes.c_uint32.from_buffer(limits, 16).value = 0x2000  # KILL_ON_JOB_CLOSE
        kernel32.SetInformationJobObject(ctypes.c_void_p(job), 9, limits, 144)
        handle = ctypes.c_void_p(int(bridge._handle))
        kernel32.AssignProcessToJobObject(ctypes.c_void_p(job), handle)
    except Exception:
        pass
def finish():
    code = bridge.wait()
    os._exit(code if code >= 0 else 128 - code)
threading.Thread(target=finish, daemon=True).start()
while sys.stdin.buffer.read(4096):
    pass
if sys.platform == "win32":
    bridge.terminate()
else:
    bridge.send_signal(signal.SIGINT)
try:
    bridge.wait(grace)
except subprocess.TimeoutExpired:
    bridge.kill()
finish()
"""
"""The watchdog's source: `python -c WATCHDOG <grace> <marker> <bridge command...>`."""


class BridgeError(RuntimeError):
    """The bridge could not be started; the message says why and what to change."""


@dataclass(frozen=True)
class ProcessState:
    """Whether the child runs, and a short sentence for the host's status display."""

    running: bool
    text: str


class BridgeProcess:
    """One bridge at a time, behind its watchdog; stopping never blocks the host's frame loop.

    `stop` closes the watchdog's pipe and `poll`, called every frame or tick, kills the
    watchdog's process group if it is still there some seconds after the grace. The bridge's
    output goes to `log_path`; `pid_path`, where given, records the running watchdog so that a
    start after a crash of the host stops the one left behind first (macOS and Linux).
    """

    def __init__(
        self, log_path: Path, *, pid_path: Path | None = None, grace: float = STOP_GRACE
    ) -> None:
        self.log_path = Path(log_path)
        self.pid_path = Path(pid_path) if pid_path is not None else None
        self.grace = grace
        self._child: subprocess.Popen[bytes] | None = None
        self._pipe: int | None = None
        self._kill_at: float | None = None
        self._state = ProcessState(False, "stopped")

    @property
    def pid(self) -> int | None:
        """The watchdog's process id while it runs."""
        return self._child.pid if self._child is not None else None

    def start(self, command: Sequence[str]) -> None:
        """Start the bridge, or raise BridgeError if one runs or the Python cannot be found."""
        if self.poll().running:
            raise BridgeError("The bridge is already running; stop it before starting it again.")
        python = command[0]
        if shutil.which(python) is None:
            raise BridgeError(
                f"Python executable {python!r} was not found; set it to the python of the "
                "environment where streamdiffusion-bridge is installed."
            )
        stop_left_behind(self.pid_path, self.grace)
        marker = _MARKER_PREFIX + uuid.uuid4().hex
        watched = [python, "-c", WATCHDOG, str(self.grace), marker, *command]
        # A session of its own on macOS and Linux: Ctrl+C in the terminal that started the
        # host does not reach the bridge twice, and the final kill takes the whole group.
        options: dict = (
            {"creationflags": subprocess.CREATE_NO_WINDOW}
            if sys.platform == "win32"
            else {"start_new_session": True}
        )
        environment = dict(os.environ, PYTHONUNBUFFERED="1")
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        read_end, self._pipe = os.pipe()
        try:
            with self.log_path.open("wb") as log:
                self._child = subprocess.Popen(
                    watched,
                    stdin=read_end,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    env=environment,
                    **options,
                )
        except OSError:
            os.close(self._pipe)
            self._pipe = None
            raise
        finally:
            os.close(read_end)
        if self.pid_path is not None:
            self.pid_path.parent.mkdir(parents=True, exist_ok=True)
            self.pid_path.write_text(f"{self._child.pid} {marker}\n")
        self._kill_at = None
        self._state = ProcessState(True, f"running (pid {self._child.pid})")

    def stop(self) -> None:
        """Ask the bridge to finish; `poll` kills it if it has not some seconds after `grace`."""
        if self._child is None or self._child.poll() is not None or self._kill_at is not None:
            return
        self._close_pipe()
        self._kill_at = time.monotonic() + self.grace + _KILL_MARGIN
        self._state = ProcessState(True, f"stopping (pid {self._child.pid})")

    def stop_and_wait(self) -> None:
        """Stop the bridge and wait until it is gone (when the host unloads the plugin)."""
        self.stop()
        if self._child is None:
            return
        try:
            self._child.wait(timeout=self.grace + _KILL_MARGIN)
        except subprocess.TimeoutExpired:
            self._kill()
        self.poll()

    def poll(self) -> ProcessState:
        """Check on the bridge: kill it when its grace ran out, and tell how it ended."""
        child = self._child
        if child is None:
            return self._state
        code = child.poll()
        if code is None:
            if self._kill_at is None or time.monotonic() < self._kill_at:
                return self._state
            self._kill()
            code = child.returncode
        stopped_on_request = self._kill_at is not None
        self._child = None
        self._kill_at = None
        self._close_pipe()
        _forget(self.pid_path, child.pid)
        if stopped_on_request or code == 0:
            self._state = ProcessState(False, "stopped")
        else:
            self._state = ProcessState(False, f"exited with code {code}: {self.exit_reason()}")
        return self._state

    def exit_reason(self) -> str:
        """The bridge's last words: its error sentence, unwrapped, or else its last line."""
        try:
            with self.log_path.open("rb") as log:
                log.seek(0, os.SEEK_END)
                log.seek(max(0, log.tell() - _LOG_TAIL_BYTES))
                tail = log.read().decode("utf-8", "replace")
        except OSError:
            tail = ""
        # Hosts refuse text with NUL or other control characters in a parameter.
        tail = "".join(char for char in tail if char.isprintable() or char == "\n")
        lines = [line.strip() for line in tail.splitlines() if line.strip()]
        for start in range(len(lines) - 1, -1, -1):
            if lines[start].startswith(ERROR_PREFIX):
                # A console narrower than the sentence wraps it over several lines.
                return " ".join(lines[start:]).removeprefix(ERROR_PREFIX).strip()
        return lines[-1] if lines else f"no output; see {self.log_path}"

    def _kill(self) -> None:
        assert self._child is not None
        if sys.platform == "win32":
            self._child.kill()  # the job object takes the bridge with the watchdog
        else:
            try:
                os.killpg(self._child.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self._child.wait()

    def _close_pipe(self) -> None:
        if self._pipe is not None:
            os.close(self._pipe)
            self._pipe = None


def stop_left_behind(pid_path: Path | None, grace: float = STOP_GRACE) -> bool:
    """Stop the watchdog recorded at `pid_path` if it still runs; return whether one did.

    A host killed before it could stop its bridge leaves the record behind. The process is
    only touched if its command line still carries the record's marker, so a reused process
    id is left alone. Windows needs none of this: its job object ends the bridge with the host.
    """
    if pid_path is None or sys.platform == "win32":
        return False
    try:
        pid_text, marker = pid_path.read_text().split()
        pid = int(pid_text)
    except (OSError, ValueError):
        return False
    if not marker.startswith(_MARKER_PREFIX) or not _carries(pid, marker):
        _forget(pid_path, pid)
        return False
    try:
        os.killpg(pid, signal.SIGINT)
        deadline = time.monotonic() + grace + _KILL_MARGIN
        while _carries(pid, marker):
            if time.monotonic() >= deadline:
                os.killpg(pid, signal.SIGKILL)
                break
            time.sleep(0.05)
    except OSError:
        pass  # it ended meanwhile, or belongs to another user
    _forget(pid_path, pid)
    return True


def _carries(pid: int, marker: str) -> bool:
    """Whether process `pid` runs with `marker` on its command line (macOS and Linux)."""
    try:
        listed = subprocess.run(
            ["ps", "-ww", "-o", "args=", "-p", str(pid)],
            capture_output=True,
            text=True,
            timeout=5,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    return marker in listed.stdout


def _forget(pid_path: Path | None, pid: int) -> None:
    """Remove the record at `pid_path` if it is still the one of `pid`."""
    if pid_path is None:
        return
    try:
        if pid_path.read_text().split()[0] == str(pid):
            pid_path.unlink()
    except (OSError, IndexError):
        pass
