"""The component's command line (toe/sdb_process.py), read by the bridge's own parser and settings.

The process handling around it is tested in test_supervisor.py.
"""

from __future__ import annotations

import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import sdb_process
import sdb_supervisor

from bridge.control import OscClient, ParamStore
from bridge.io.shm_protocol import validate_name
from bridge.runtime.settings import parse_lora
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
    similarity_filter=True,
    similarity_threshold=0.9,
    max_skip_frames=4,
    precision="fp8",
    compile_scope="blocks",
    live_compile=False,
    background_compile=True,
    feature_bank_size=3,
)


def test_the_command_line_is_read_by_the_bridge_as_the_settings_say() -> None:
    run = parsed_run_settings(sdb_process.bridge_command(SETTINGS))
    assert run.input == "shm:stage-in"
    assert run.output == ["shm:stage-out"]
    assert (run.model, run.vae, run.accel) == ("synthetic:tiny", "model", "none")
    assert (run.precision, run.compile_scope, run.live_compile) == ("fp8", "blocks", False)
    assert run.background_compile is True
    assert run.feature_bank_size == 3
    assert (run.width, run.height) == (64, 96)
    assert (run.osc_host, run.osc_port, run.osc_feedback) == ("127.0.0.1", 7100, ["127.0.0.1:7101"])
    assert run.prompt == "-a forest, oil on canvas"
    assert run.negative_prompt == "blurry"
    assert run.t_index_list == (20, 35, 45)
    assert (run.cfg_type, run.guidance_scale, run.delta, run.seed) == ("full", 1.5, 0.6, 42)
    assert (run.similarity_filter, run.similarity_threshold, run.max_skip_frames) == (True, 0.9, 4)
    ParamStore(run.store_values())  # the values pass the bridge's own validation


def test_a_filter_that_is_off_and_an_empty_negative_prompt_add_no_flags() -> None:
    settings = replace(SETTINGS, similarity_filter=False, negative_prompt="", tiny_vae=True)
    command = sdb_process.bridge_command(settings)
    assert "--similarity-filter" not in command
    assert not any(part.startswith("--negative-prompt") for part in command)
    run = parsed_run_settings(command)
    assert (run.similarity_filter, run.negative_prompt, run.vae) == (False, "", "tiny")


def test_auto_transport_is_spout_on_windows_and_shared_memory_elsewhere() -> None:
    assert sdb_process.resolve_transport("auto", "win32") == "spout"
    assert sdb_process.resolve_transport("auto", "darwin") == "shm"
    assert sdb_process.resolve_transport("auto", "linux") == "shm"
    assert sdb_process.resolve_transport("shm", "win32") == "shm"
    assert sdb_process.resolve_transport("ndi", "linux") == "ndi"
    assert sdb_process.stream_uris("ndi", "td") == ("ndi:td-in", "ndi:td-out")
    with pytest.raises(ValueError, match="pick one of auto, spout, shm"):
        sdb_process.resolve_transport("rtsp")


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
    process = sdb_supervisor.BridgeProcess(tmp_path / "bridge.log")
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
    deadline = time.monotonic() + 30
    while process.poll().running:
        assert time.monotonic() < deadline, "the bridge did not stop"
        time.sleep(0.05)
    assert process.poll().text == "stopped"


def test_each_lora_slot_with_a_file_starts_the_bridge_with_it_at_its_scale() -> None:
    settings = replace(SETTINGS, loras=[("C:/loras/style.safetensors", 0.8)])
    run = parsed_run_settings(sdb_process.bridge_command(settings))
    assert list(run.lora) == ["C:/loras/style.safetensors:0.8"]
    assert parse_lora(run.lora[0]) == ("C:/loras/style.safetensors", 0.8)


def test_an_ip_adapter_file_starts_the_bridge_with_it_its_picture_and_its_scale() -> None:
    settings = replace(
        SETTINGS,
        ip_adapter="C:/models/ip-adapter_sd15.safetensors",
        ip_adapter_image="spout:Style",
        ip_adapter_scale=0.8,
    )
    run = parsed_run_settings(sdb_process.bridge_command(settings))
    assert (run.ip_adapter, run.ip_adapter_image) == (
        "C:/models/ip-adapter_sd15.safetensors",
        "spout:Style",
    )
    assert run.ip_adapter_scale == 0.8
    without = sdb_process.bridge_command(replace(settings, ip_adapter=""))
    assert not any(part.startswith("--ip-adapter") for part in without)
