"""Talking to the server with liblo's oscsend and oscdump, an independent OSC implementation."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import threading
from collections.abc import Iterator

import pytest

from bridge.control import OscServer, ParamStore
from tests.control.helpers import wait_until


@pytest.fixture(scope="module")
def liblo_tools() -> None:
    """Make sure oscsend and oscdump exist, installing liblo-tools where apt can."""
    if shutil.which("oscsend") and shutil.which("oscdump"):
        return
    if shutil.which("apt-get") and hasattr(os, "geteuid") and os.geteuid() == 0:
        subprocess.run(
            ["apt-get", "install", "-y", "-q", "liblo-tools"],
            capture_output=True,
            timeout=300,
            check=False,
        )
    if not (shutil.which("oscsend") and shutil.which("oscdump")):
        pytest.skip("liblo-tools (oscsend, oscdump) is not installed and apt could not install it")


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def oscsend(port: int, address: str, types: str, *values: str) -> None:
    subprocess.run(
        ["oscsend", "127.0.0.1", str(port), address, types, *values], check=True, timeout=10
    )


@pytest.fixture
def oscdump(liblo_tools: None) -> Iterator[tuple[int, list[str]]]:
    """A running oscdump: its port and the lines it has printed so far."""
    port = free_udp_port()
    process = subprocess.Popen(
        ["oscdump", "-L", str(port)], stdout=subprocess.PIPE, text=True, bufsize=1
    )
    lines: list[str] = []

    def read() -> None:
        assert process.stdout is not None
        for line in process.stdout:
            lines.append(line.strip())

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        yield port, lines
    finally:
        process.terminate()
        process.wait(timeout=5)
        reader.join(timeout=5)


def test_oscsend_changes_the_prompt(
    liblo_tools: None, store: ParamStore, server: OscServer
) -> None:
    oscsend(server.address[1], "/sd/prompt", "s", "a forest")
    assert wait_until(lambda: store.get("prompt") == "a forest")


def test_oscsend_sets_true_false_and_several_ints(
    liblo_tools: None, store: ParamStore, server: OscServer
) -> None:
    port = server.address[1]
    oscsend(port, "/sd/filter/enable", "T")
    oscsend(port, "/sd/t_index", "iii", "20", "35", "45")
    oscsend(port, "/sd/delta", "d", "0.25")
    assert wait_until(lambda: store.get("delta") == 0.25)
    assert store.get("similarity_filter") is True
    assert store.get("t_index_list") == (20, 35, 45)


def test_oscdump_reads_status_after_an_oscsend_subscription(
    oscdump: tuple[int, list[str]], server: OscServer
) -> None:
    dump_port, lines = oscdump
    oscsend(server.address[1], "/sd/subscribe", "i", str(dump_port))
    assert wait_until(lambda: len(server.subscribers) == 1)

    def all_four_arrived() -> bool:
        server.publish_status(29.5, 12.25, 3, 4)
        return len(lines) >= 4

    assert wait_until(all_four_arrived, timeout=5.0)
    # oscdump prints "<time tag> <address> <types> <values>".
    assert [line.split(" ", 1)[1] for line in lines[:4]] == [
        "/sd/status/fps f 29.500000",
        "/sd/status/latency_ms f 12.250000",
        "/sd/status/drops i 3",
        "/sd/status/skips i 4",
    ]
