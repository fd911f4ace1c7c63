"""Two bridges side by side on one machine, as on a box with several GPUs (docs/rig.md).

Each has its own OSC port, prompt and output name; both must deliver at the same time, and each
must answer on its own port with its own settings.
"""

from __future__ import annotations

import time

import pytest

from bridge.control import OscClient
from bridge.io.shm_protocol import ShmReader
from tests.runtime.helpers import free_port

TINY = ("--model", "synthetic:tiny", "--width", "64", "--height", "64", "--device", "cpu")


def wait_for_reader(name: str, process, timeout: float) -> ShmReader:
    deadline = time.monotonic() + timeout
    while True:
        assert process.poll() is None, process.communicate()[1]
        try:
            return ShmReader(name)
        except Exception:
            assert time.monotonic() < deadline, f"no output {name} within {timeout} s"
        time.sleep(0.05)


def counters(reader: ShmReader, count: int, timeout: float) -> list[int]:
    """Frame counters of the next `count` frames the reader gets; fewer if they do not come."""
    seen: list[int] = []
    deadline = time.monotonic() + timeout
    while len(seen) < count and time.monotonic() < deadline:
        got = reader.read()
        if got is not None:
            seen.append(got[1].frame_counter)
        time.sleep(0.005)
    return seen


@pytest.mark.slow
def test_two_bridges_with_their_own_ports_and_names_both_deliver(bridge_process, shm_name):
    names = [shm_name(), shm_name()]
    ports = [free_port(), free_port()]
    while ports[1] == ports[0]:
        ports[1] = free_port()
    prompts = ["a red lighthouse", "a blue forest"]
    processes = [
        bridge_process(
            *TINY,
            "--input",
            "pattern:bars",
            "--output",
            f"shm:{name}",
            "--osc-port",
            str(port),
            "--prompt",
            prompt,
            "--quiet",
        )
        for name, port, prompt in zip(names, ports, prompts, strict=True)
    ]
    readers = [
        wait_for_reader(name, process, 120) for name, process in zip(names, processes, strict=True)
    ]

    # Both running now: each keeps publishing new frames while the other one runs.
    before = [counters(reader, 1, 60) for reader in readers]
    for reader, process, first in zip(readers, processes, before, strict=True):
        later = counters(reader, 2, 60)
        assert process.poll() is None, process.communicate()[1]
        assert len(first) == 1 and len(later) == 2
        assert first[0] < later[0] < later[1]

    for port, prompt in zip(ports, prompts, strict=True):
        with OscClient("127.0.0.1", port, timeout=5.0) as client:
            assert client.get("prompt") == [prompt]
    for reader in readers:
        reader.close()
