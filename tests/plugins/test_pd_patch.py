"""plugins/music/sd-bridge.pd in a real Pure Data (`pd -nogui`), sending to the real bridge.

Pd runs without audio, MIDI or GUI; the test drives the patch through the receive names it
documents (`sd-connect`, `sd-next`, `sd-delta`, ...) with `-send` messages, then quits it. The
MIDI note and mod-wheel paths feed the same receives and cannot run without a MIDI device.

Needs the Debian package puredata-core; skipped with the reason when it is missing.
"""

from __future__ import annotations

import signal
import socket
import subprocess
import time
from collections.abc import Iterator

import pytest
from pythonosc.osc_packet import OscPacket

from bridge.control import OscClient, OscServer, ParamStore
from bridge.control.params import LORA_SCALES
from tests.control.helpers import wait_until
from tests.plugins.helpers import MUSIC, free_udp_port, require_program

PATCH = MUSIC / "sd-bridge.pd"
PROMPTS = [
    "a forest at dawn, oil on canvas",
    "neon city in the rain, cinematic",
    "a portrait made of flowers",
    "underwater cathedral, volumetric light",
    "tokyo 2049, glass and chrome",
]


@pytest.fixture(scope="module")
def pd() -> str:
    return require_program("pd", "puredata-core")


def run_patch(pd: str, port: int, *messages: str) -> subprocess.CompletedProcess:
    """Open the patch, point it at `port`, send `messages` to its receives, then quit."""
    sends = [f"sd-connect 127.0.0.1 {port}", *messages, "pd quit"]
    command = [pd, "-nogui", "-noaudio", "-nomidi", "-stderr", "-open", str(PATCH)]
    for message in sends:
        command += ["-send", message]
    return subprocess.run(command, capture_output=True, text=True, timeout=30, check=False)


@pytest.fixture
def listener() -> Iterator[tuple[socket.socket, int]]:
    """A UDP socket recording what arrives, and its port."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        sock.settimeout(0.5)
        yield sock, sock.getsockname()[1]


def received(sock: socket.socket) -> list[tuple[str, list]]:
    messages = []
    while True:
        try:
            data = sock.recv(65535)
        except TimeoutError:
            return messages
        messages += [(m.message.address, m.message.params) for m in OscPacket(data).messages]


def test_the_patch_loads_without_errors(pd: str, listener: tuple[socket.socket, int]) -> None:
    done = run_patch(pd, listener[1])
    assert done.returncode == 0
    assert "error" not in done.stderr.lower() and "fail" not in done.stderr.lower(), done.stderr


def test_next_steps_through_the_prompts_in_order_and_wraps_around(
    pd: str, listener: tuple[socket.socket, int]
) -> None:
    sock, port = listener
    done = run_patch(pd, port, *["sd-next bang"] * 6, "sd-prompt-index 3", "sd-next bang")
    assert done.returncode == 0, done.stderr
    prompts = [args for address, args in received(sock) if address == "/sd/prompt"]
    assert prompts == [[text] for text in [*PROMPTS, PROMPTS[0], PROMPTS[3], PROMPTS[4]]]


def test_prompt_delta_fades_and_seed_reach_the_bridge_server(
    pd: str, server: OscServer, store: ParamStore
) -> None:
    done = run_patch(
        pd,
        server.address[1],
        "sd-prompt-fade 2.5",
        "sd-seed-fade 1.5",
        "sd-next bang",
        "sd-next bang",
        "sd-delta 0.4",
        "sd-seed 42",
    )
    assert done.returncode == 0, done.stderr
    assert wait_until(lambda: store.get("seed") == 42)
    assert store.get("prompt") == PROMPTS[1]
    assert store.get("delta") == pytest.approx(0.4)
    assert store.get("prompt_fade") == 2.5
    assert store.get("seed_fade") == 1.5
    assert server.stats.errors == 0


def test_the_largest_seed_the_patch_offers_arrives_exact(
    pd: str, server: OscServer, store: ParamStore
) -> None:
    seed_box = next(line for line in PATCH.read_text().splitlines() if "sd-seed 0;" in line)
    top = int(seed_box.split()[6])  # "#X floatatom x y width min max ..."
    assert top == 2**24  # every whole number up to here is exact in a 32-bit float
    done = run_patch(pd, server.address[1], f"sd-seed {top}")
    assert done.returncode == 0, done.stderr
    assert wait_until(lambda: store.get("seed") == top)


def test_a_new_random_seed_is_a_whole_number_the_bridge_accepts(
    pd: str, server: OscServer, store: ParamStore
) -> None:
    done = run_patch(pd, server.address[1], "sd-new-seed bang")
    assert done.returncode == 0, done.stderr
    assert wait_until(lambda: store.get("seed") != 2)
    assert 0 <= store.get("seed") < 1_000_000
    assert server.stats.errors == 0


@pytest.fixture
def lora_server() -> Iterator[tuple[OscServer, ParamStore]]:
    """The bridge's OSC server for a bridge that loaded two LoRA files live, both at 1."""
    store = ParamStore(families={LORA_SCALES: [1.0, 1.0]})
    with OscServer(store, port=0) as running:
        yield running, store


def test_the_lora_scales_reach_the_bridge_server(
    pd: str, lora_server: tuple[OscServer, ParamStore]
) -> None:
    server, store = lora_server
    done = run_patch(pd, server.address[1], "sd-lora-0 -1.5", "sd-lora-1 0.25")
    assert done.returncode == 0, done.stderr
    assert wait_until(lambda: store.get("lora_1_scale") == 0.25)
    assert store.get("lora_0_scale") == -1.5
    assert server.stats.errors == 0


@pytest.mark.parametrize("index", [0, 1])
def test_each_lora_slider_spans_the_bridges_range_and_sends_its_scale(
    pd: str, listener: tuple[socket.socket, int], index: int
) -> None:
    slider = next(
        line.split()
        for line in PATCH.read_text().splitlines()
        if line.startswith("#X obj") and " hsl " in line and f" sd-lora-{index} " in line
    )
    # "#X obj x y hsl width height bottom top log init send receive ..."
    assert (float(slider[7]), float(slider[8])) == (LORA_SCALES.minimum, LORA_SCALES.maximum)
    sock, port = listener
    # The slider's receive name moves it, and it sends what it shows.
    done = run_patch(pd, port, f"{slider[12]} 0.75")
    assert done.returncode == 0, done.stderr
    assert received(sock) == [(f"/sd/lora/{index}/scale", [0.75])]


@pytest.mark.slow
def test_the_patch_steers_a_running_bridge(pd: str, bridge_python: str) -> None:
    port = free_udp_port()
    bridge = subprocess.Popen(
        [
            bridge_python,
            "-m",
            "bridge.cli",
            "run",
            "--model=synthetic:tiny",
            "--width=64",
            "--height=64",
            "--input=pattern:bars",
            "--output=null",
            f"--osc-port={port}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        with OscClient("127.0.0.1", port, timeout=0.5) as client:
            deadline = time.monotonic() + 60
            while True:
                assert bridge.poll() is None, "the bridge exited"
                try:
                    client.get("/sd/prompt")
                    break
                except TimeoutError:
                    assert time.monotonic() < deadline, "the bridge never answered"
            done = run_patch(pd, port, *["sd-next bang"] * 3, "sd-delta 0.3")
            assert done.returncode == 0, done.stderr
            assert wait_until(lambda: client.get("/sd/delta") == [pytest.approx(0.3)])
            assert client.get("/sd/prompt") == [PROMPTS[2]]
    finally:
        bridge.send_signal(signal.SIGINT)
        try:
            bridge.wait(timeout=30)
        except subprocess.TimeoutExpired:
            bridge.kill()
            bridge.wait()
