"""The OBS script's LoRA slots: files on the command line, their scales live over OSC."""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from dataclasses import replace

import pytest
import sd_bridge_core as core

from bridge.control import OscServer, ParamStore
from bridge.control.params import LORA_SCALES
from bridge.runtime.settings import parse_lora
from tests.control.helpers import wait_until
from tests.plugins.helpers import parsed_run_settings

LAUNCH = core.Launch(
    python=sys.executable,
    model="synthetic:tiny",
    input_kind="pattern",
    camera="",
    input_sender="",
    output_kind="vcam",
    output_device="",
    output_sender="",
    width=64,
    height=64,
    osc_port=7300,
    values={"lora_0_scale": 0.6},
)


@pytest.fixture
def lora_server() -> Iterator[tuple[OscServer, ParamStore]]:
    """A bridge's OSC server that loaded one LoRA file live."""
    store = ParamStore(families={LORA_SCALES: [0.6]})
    with OscServer(store, port=0) as server:
        yield server, store


def test_each_lora_slot_scale_matches_the_bridge_lora_family() -> None:
    for slot, setting in enumerate(core.LORA_SETTINGS):
        assert setting.address == LORA_SCALES.address.format(index=slot)
        assert (setting.minimum, setting.maximum) == (LORA_SCALES.minimum, LORA_SCALES.maximum)


def test_the_bridge_starts_with_each_lora_file_at_its_slider_scale() -> None:
    launch = replace(LAUNCH, loras=["C:/loras/style.safetensors", ""])
    run = parsed_run_settings(core.bridge_command(launch, "linux"))
    assert [parse_lora(entry) for entry in run.lora] == [("C:/loras/style.safetensors", 0.6)]


def test_a_lora_file_after_an_empty_slot_is_refused_with_a_sentence() -> None:
    launch = replace(LAUNCH, loras=["", "style.safetensors"])
    with pytest.raises(ValueError, match="fill the LoRA slots in order"):
        core.bridge_command(launch, "linux")


def test_only_the_scales_of_loaded_loras_are_sent(lora_server) -> None:
    server, store = lora_server
    link = core.OscLink(*server.address)
    controller = core.Controller(link)
    try:
        controller.loras = 1
        controller.update({"lora_0_scale": -1.5, "lora_1_scale": 0.25})
        assert wait_until(lambda: store.get("lora_0_scale") == -1.5)
        time.sleep(0.2)
        assert server.stats.errors == 0  # nothing went to the unloaded /sd/lora/1/scale
    finally:
        link.close()
