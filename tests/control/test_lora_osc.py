"""LoRA scales over OSC: `/sd/lora/<index>/scale` for each LoRA loaded live, and no others."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator

import pytest

from bridge.control import OscClient, OscServer, ParamStore
from bridge.control.params import LORA_SCALES, PARAMS
from bridge.models import ensure_synthetic
from tests.control.helpers import receive_all
from tests.models.loras import write_lora
from tests.runtime.helpers import first_answer, free_port


@pytest.fixture
def lora_store() -> ParamStore:
    """A store for a bridge that loaded two LoRA files live, at 0.8 and -0.5."""
    return ParamStore(families={LORA_SCALES: [0.8, -0.5]})


@pytest.fixture
def lora_client(lora_store: ParamStore) -> Iterator[OscClient]:
    with (
        OscServer(lora_store, port=0) as server,
        OscClient(*server.address, local_host="127.0.0.1", timeout=2.0) as client,
    ):
        yield client


def test_each_loaded_lora_has_a_scale_address(lora_store, lora_client) -> None:
    lora_client.send("/sd/lora/1/scale", 1.25)
    assert lora_client.get("/sd/lora/1/scale") == [1.25]
    assert lora_store.get("lora_1_scale") == 1.25
    lora_client.send("/sd/get", "lora_0_scale")
    assert lora_client.receive() == ("/sd/value", ["/sd/lora/0/scale", pytest.approx(0.8)])


def test_list_and_get_carry_the_lora_scales_after_the_schema(lora_client) -> None:
    lora_client.send("/sd/list")
    described = {args[0]: args[1:] for _, args in receive_all(lora_client)}
    addresses = [p.address for p in PARAMS] + ["/sd/lora/0/scale", "/sd/lora/1/scale"]
    assert list(described) == addresses
    assert described["/sd/lora/1/scale"] == ["f", -2.0, 2.0, -0.5]
    lora_client.send("/sd/get")
    assert [args[0] for _, args in receive_all(lora_client)] == addresses


@pytest.mark.parametrize("value", [2.5, -2.01, float("nan"), float("inf"), "high"])
def test_a_scale_out_of_range_or_not_a_finite_number_is_refused(
    lora_store, lora_client, value
) -> None:
    lora_client.send("/sd/lora/0/scale", value)
    error = lora_client.receive()
    assert error is not None and error[0] == "/sd/error"
    assert error[1][0] == "/sd/lora/0/scale" and "from -2.0 to 2.0" in error[1][1]
    assert lora_store.get("lora_0_scale") == pytest.approx(0.8)


def test_an_index_out_of_range_is_one_sentence_naming_the_allowed_ones(lora_client) -> None:
    lora_client.send("/sd/lora/5/scale", 0.5)
    assert lora_client.receive() == (
        "/sd/error",
        [
            "/sd/lora/5/scale",
            "/sd/lora/5/scale names LoRA 5, but only 2 LoRAs are loaded live; "
            "send an index from 0 to 1.",
        ],
    )
    lora_client.send("/sd/get", "/sd/lora/2/scale")
    error = lora_client.receive()
    assert error is not None and error[1] == [
        "/sd/get",
        "/sd/lora/2/scale names LoRA 2, but only 2 LoRAs are loaded live; "
        "send an index from 0 to 1.",
    ]
    assert lora_client.get("/sd/lora/1/scale") == [-0.5]  # still serving


def test_without_live_loras_a_scale_address_says_how_to_load_one(client) -> None:
    client.send("/sd/lora/0/scale", 0.5)
    error = client.receive()
    assert error is not None and "no LoRA is loaded live" in error[1][1]
    assert "fuse_loras off" in error[1][1]


def test_a_start_scale_out_of_range_is_refused_when_the_store_is_made() -> None:
    with pytest.raises(ValueError, match="LoRA 1 starts at 3.0; use a float from -2.0 to 2.0"):
        ParamStore(families={LORA_SCALES: [0.5, 3.0]})


@pytest.mark.slow
def test_a_running_bridge_moves_the_scale_of_its_lora_and_refuses_index_5(tmp_path) -> None:
    cache = tmp_path / "cache"
    tiny = ensure_synthetic("tiny", cache / "synthetic")
    lora = write_lora(tiny, tmp_path / "style.safetensors", seed=0, text_modules=("q_proj",))
    port = free_port()
    env = {**os.environ, "SD_BRIDGE_CACHE": str(cache), "PYTHONUNBUFFERED": "1"}
    command = [sys.executable, "-m", "bridge.cli", "run", "--model", "synthetic:tiny"]
    command += ["--width", "64", "--height", "64", "--output", "null", "--quiet"]
    command += ["--lora", f"{lora}:0.5", "--osc-port", str(port)]
    process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True, env=env)
    try:
        with OscClient("127.0.0.1", port, timeout=1.0) as client:
            reply = first_answer(client, process, "/sd/lora/0/scale")
            assert reply == ("/sd/value", ["/sd/lora/0/scale", 0.5])
            client.send("/sd/lora/0/scale", -1.25)
            assert client.get("/sd/lora/0/scale") == [-1.25]
            client.send("/sd/lora/5/scale", 1.0)
            error = client.receive(2.0)
            assert error is not None and error[1][1].endswith("send index 0.")
            assert error[1][1].count(". ") == 0
            assert client.get("/sd/lora/0/scale") == [-1.25]
            assert process.poll() is None
    finally:
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=60)
    assert "Traceback" not in stderr


@pytest.mark.slow
def test_a_bridge_started_with_fuse_loras_has_no_live_scale_to_move(tmp_path) -> None:
    cache = tmp_path / "cache"
    tiny = ensure_synthetic("tiny", cache / "synthetic")
    lora = write_lora(tiny, tmp_path / "style.safetensors", seed=0, text_modules=("q_proj",))
    port = free_port()
    env = {**os.environ, "SD_BRIDGE_CACHE": str(cache), "PYTHONUNBUFFERED": "1"}
    command = [sys.executable, "-m", "bridge.cli", "run", "--model", "synthetic:tiny"]
    command += ["--width", "64", "--height", "64", "--output", "null", "--quiet"]
    command += ["--lora", f"{lora}:0.5", "--fuse-loras", "--osc-port", str(port)]
    process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True, env=env)
    try:
        with OscClient("127.0.0.1", port, timeout=1.0) as client:
            assert first_answer(client, process, "seed") is not None
            client.send("/sd/lora/0/scale", 1.0)
            error = client.receive(2.0)
            assert error is not None and error[0] == "/sd/error"
            assert error[1][0] == "/sd/lora/0/scale"
            assert process.poll() is None
    finally:
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=60)
    assert "Traceback" not in stderr
