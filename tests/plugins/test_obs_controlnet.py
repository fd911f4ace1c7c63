"""The OBS script's ControlNet slots: models and control sources on the command line, their values
live over OSC, to the bridge's own ControlNet parameters."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import replace

import pytest
import sd_bridge_core as core

from bridge.control import OscServer, ParamStore
from bridge.control.params import CONTROLNET_FAMILIES
from bridge.runtime.controlnets import ControlNetEntry, controlnet_families, parse_controlnet
from tests.control.helpers import wait_until
from tests.plugins.helpers import parsed_run_settings
from tests.plugins.test_obs_lora import LAUNCH


def test_each_slot_has_the_bridge_controlnet_parameters_with_their_ranges_and_defaults():
    starts = controlnet_families([ControlNetEntry("cn")] * core.CONTROLNET_SLOTS)
    members = {
        param.address: param
        for family in CONTROLNET_FAMILIES
        for param in family.members(starts[family])
    }
    assert {setting.address for setting in core.CONTROLNET_SETTINGS} == set(members)
    for setting in core.CONTROLNET_SETTINGS:
        schema = members[setting.address]
        assert schema.validate(setting.default) == schema.default
        if setting.kind == "float":
            assert (setting.minimum, setting.maximum) == (schema.minimum, schema.maximum)


def test_the_bridge_starts_with_the_slots_in_use_at_their_slider_scales():
    launch = replace(
        LAUNCH,
        controlnets=[("synthetic:controlnet-tiny", ""), ("C:/cn/depth", "ndi:Kinect")],
        values={"controlnet_0_scale": 0.6, "controlnet_1_scale": 1.25},
    )
    command = core.bridge_command(launch, "linux")
    assert "--controlnet=synthetic:controlnet-tiny@canny@0.6" in command  # canny, said plainly
    run = parsed_run_settings(command)
    assert [parse_controlnet(entry) for entry in run.controlnet] == [
        ControlNetEntry("synthetic:controlnet-tiny", "canny", 0.6),
        ControlNetEntry("C:/cn/depth", "ndi:Kinect", 1.25),
    ]


def test_a_model_after_an_empty_slot_is_refused_with_a_sentence():
    launch = replace(LAUNCH, controlnets=[("", ""), ("synthetic:controlnet-tiny", "canny")])
    with pytest.raises(ValueError, match="fill the ControlNet slots in order"):
        core.bridge_command(launch, "linux")


@pytest.fixture
def controlnet_server() -> Iterator[tuple[OscServer, ParamStore]]:
    """A bridge's OSC server that was started with one ControlNet."""
    store = ParamStore(families=controlnet_families([ControlNetEntry("cn")]))
    with OscServer(store, port=0) as server:
        yield server, store


def test_only_the_values_of_loaded_controlnets_are_sent(controlnet_server):
    server, store = controlnet_server
    link = core.OscLink(*server.address)
    controller = core.Controller(link)
    try:
        controller.controlnets = 1
        controller.update(
            {
                "controlnet_0_scale": 0.3,
                "controlnet_0_enable": False,
                "controlnet_0_canny_high": 150.0,
                "controlnet_1_scale": 0.9,
            }
        )
        assert wait_until(lambda: store.get("controlnet_0_enable") is False)
        assert store.get("controlnet_0_scale") == pytest.approx(0.3)
        assert store.get("controlnet_0_canny_high") == 150.0
        time.sleep(0.2)
        assert server.stats.errors == 0  # nothing went to the unloaded /sd/controlnet/1/...
    finally:
        link.close()
