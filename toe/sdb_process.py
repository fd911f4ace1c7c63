"""Starting and stopping `sd-bridge run` as a child process, with URIs matching the component.

Plain Python without TouchDesigner. The child runs `<python> -m bridge.cli run ...` with the
Python of the environment where streamdiffusion-bridge is installed (TouchDesigner's own Python
cannot run the bridge). Its output goes to a log file; the error sentence at its end explains an
early exit.
"""

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

STOP_GRACE = 5.0
"""Seconds a stopping bridge gets to close its outputs before it is killed."""

TRANSPORTS = ("auto", "spout", "shm")
ACCELS = ("auto", "none", "cudagraph", "compile")
_STREAM_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,15}")
_LOG_TAIL_BYTES = 8192
ERROR_PREFIX = "sd-bridge:"
"""How the bridge starts the sentence it prints when it stops on an error."""


class BridgeError(RuntimeError):
    """The bridge could not be started; the message says why and what to change."""


def resolve_transport(choice: str, platform: str = sys.platform) -> str:
    """`spout` or `shm` for a Transport menu choice; `auto` is Spout on Windows only."""
    if choice == "auto":
        return "spout" if platform == "win32" else "shm"
    if choice not in TRANSPORTS:
        raise ValueError(f"Transport {choice!r} is unknown; pick one of {', '.join(TRANSPORTS)}.")
    return choice


def stream_uris(transport: str, name: str) -> tuple[str, str]:
    """The bridge's input and output URIs for a stream name: `<transport>:<name>-in` / `-out`."""
    if not _STREAM_NAME.fullmatch(name):
        raise ValueError(
            f"Stream name {name!r} must be 1 to 16 characters from A-Z a-z 0-9 _ -, "
            "starting with a letter or digit."
        )
    return f"{transport}:{name}-in", f"{transport}:{name}-out"


@dataclass(frozen=True)
class BridgeSettings:
    """Everything `sd-bridge run` is started with."""

    python: str
    input_uri: str
    output_uri: str
    model: str
    width: int
    height: int
    tiny_vae: bool
    accel: str
    osc_port: int
    feedback_port: int
    prompt: str
    negative_prompt: str
    t_index: Sequence[int]
    cfg: str
    guidance: float
    delta: float
    seed: int
    filter_enable: bool
    filter_threshold: float
    filter_max_skip: int


def bridge_command(settings: BridgeSettings) -> list[str]:
    """The command line that starts the bridge with `settings`, as a list of arguments.

    Values are joined to their flags (`--prompt=-blurry`), so text starting with a dash stays a
    value.
    """
    command = [
        settings.python,
        "-m",
        "bridge.cli",
        "run",
        f"--input={settings.input_uri}",
        f"--output={settings.output_uri}",
        f"--model={settings.model}",
        f"--vae={'tiny' if settings.tiny_vae else 'model'}",
        f"--width={settings.width}",
        f"--height={settings.height}",
        f"--accel={settings.accel}",
        "--osc-host=127.0.0.1",
        f"--osc-port={settings.osc_port}",
        f"--osc-feedback=127.0.0.1:{settings.feedback_port}",
        f"--prompt={settings.prompt}",
        f"--t-index={','.join(str(index) for index in settings.t_index)}",
        f"--cfg={settings.cfg}",
        f"--guidance={settings.guidance}",
        f"--delta={settings.delta}",
        f"--seed={settings.seed}",
        f"--filter-threshold={settings.filter_threshold}",
        f"--filter-max-skip={settings.filter_max_skip}",
    ]
    if settings.negative_prompt:
        command.append(f"--negative-prompt={settings.negative_prompt}")
    if settings.filter_enable:
        command.append("--filter")
    return command


@dataclass(frozen=True)
class ProcessState:
    """Whether the child runs, and a short sentence for the component's status."""

    running: bool
    text: str


class BridgeProcess:
    """One `sd-bridge run` child at a time; stopping never blocks the caller's frame loop.

    `stop` asks the child to finish (SIGINT on macOS and Linux, so it closes its outputs;
    Windows has no console to deliver Ctrl+Break to, so it is terminated) and `poll`, called
    every frame, kills it if it is still there `grace` seconds later.
    """

    def __init__(self, log_path: Path, *, grace: float = STOP_GRACE) -> None:
        self.log_path = Path(log_path)
        self.grace = grace
        self._child: subprocess.Popen[bytes] | None = None
        self._kill_at: float | None = None
        self._state = ProcessState(False, "stopped")

    @property
    def pid(self) -> int | None:
        """The child's process id while it runs."""
        return self._child.pid if self._child is not None else None

    def start(self, command: Sequence[str]) -> None:
        """Start the child, or raise BridgeError if one runs or the Python cannot be found."""
        if self.poll().running:
            raise BridgeError("The bridge is already running; stop it before starting it again.")
        python = command[0]
        if shutil.which(python) is None:
            raise BridgeError(
                f"Python executable {python!r} was not found; set it to the python of the "
                "environment where streamdiffusion-bridge is installed."
            )
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        environment = dict(os.environ, PYTHONUNBUFFERED="1")
        with self.log_path.open("wb") as log:
            if sys.platform == "win32":
                self._child = subprocess.Popen(
                    list(command),
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    env=environment,
                    creationflags=subprocess.CREATE_NO_WINDOW,
                )
            else:
                # A session of its own: Ctrl+C in the terminal that started the host app must
                # not reach the bridge twice.
                self._child = subprocess.Popen(
                    list(command),
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    env=environment,
                    start_new_session=True,
                )
        self._kill_at = None
        self._state = ProcessState(True, f"running (pid {self._child.pid})")

    def stop(self) -> None:
        """Ask the child to finish; `poll` kills it if it has not within `grace` seconds."""
        if self._child is None or self._child.poll() is not None or self._kill_at is not None:
            return
        if sys.platform == "win32":
            self._child.terminate()
        else:
            self._child.send_signal(signal.SIGINT)
        self._kill_at = time.monotonic() + self.grace
        self._state = ProcessState(True, f"stopping (pid {self._child.pid})")

    def stop_and_wait(self) -> None:
        """Stop the child and wait until it is gone, killing it after `grace` seconds."""
        self.stop()
        if self._child is None:
            return
        try:
            self._child.wait(timeout=self.grace)
        except subprocess.TimeoutExpired:
            self._child.kill()
            self._child.wait()
        self.poll()

    def poll(self) -> ProcessState:
        """Check on the child: kill it when its grace ran out, and tell how it ended."""
        child = self._child
        if child is None:
            return self._state
        code = child.poll()
        if code is None:
            if self._kill_at is not None and time.monotonic() >= self._kill_at:
                child.kill()
                child.wait()
                code = child.returncode
            else:
                return self._state
        stopped_on_request = self._kill_at is not None
        self._child = None
        self._kill_at = None
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
        lines = [line.strip() for line in tail.splitlines() if line.strip()]
        for start in range(len(lines) - 1, -1, -1):
            if lines[start].startswith(ERROR_PREFIX):
                # A console narrower than the sentence wraps it over several lines.
                return " ".join(lines[start:]).removeprefix(ERROR_PREFIX).strip()
        return lines[-1] if lines else f"no output; see {self.log_path}"
