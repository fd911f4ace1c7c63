"""The component's ControlNet slots: models and control sources on the command line, their values
live over OSC, to the bridge's own ControlNet parameters."""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
import sdb_osc
import sdb_process

from bridge.control import OscServer, ParamStore
from bridge.control.params import CONTROLNET_FAMILIES
from bridge.runtime.controlnets import ControlNetEntry, controlnet_families, parse_controlnet
from tests.control.helpers import wait_until
from tests.plugins import td_standin
from tests.plugins.helpers import free_udp_port, parsed_run_settings
from tests.plugins.test_td_process import SETTINGS


def test_each_slot_has_the_bridge_controlnet_parameters_with_their_ranges_and_defaults():
    starts = controlnet_families([ControlNetEntry("cn")] * sdb_osc.CONTROLNET_SLOTS)
    members = {
        param.address: param
        for family in CONTROLNET_FAMILIES
        for param in family.members(starts[family])
    }
    assert [live.address for live in sdb_osc.CONTROLNET_PARAMS] == sorted(
        members, key=lambda address: (address.split("/")[3], list(members).index(address))
    )
    for live in sdb_osc.CONTROLNET_PARAMS:
        schema = members[live.address]
        assert live.default == schema.default
        if live.kind == "float":
            assert (live.minimum, live.maximum) == (schema.minimum, schema.maximum)
        assert schema.from_osc(sdb_osc.osc_message(live, live.default)[1]) == schema.default


def test_the_bridge_starts_with_the_slots_in_use_and_reads_them_back():
    entries = sdb_osc.controlnet_entries(
        ["lllyasviel/control_v11p_sd15_canny", "C:/cn/depth", ""],
        ["", "spout:KinectDepth", "canny"],
        [0.75, 1, 1.0],
    )
    command = sdb_process.bridge_command(replace(SETTINGS, controlnets=entries))
    run = parsed_run_settings(command)
    assert [parse_controlnet(entry) for entry in run.controlnet] == [
        ControlNetEntry("lllyasviel/control_v11p_sd15_canny", "canny", 0.75),
        ControlNetEntry("C:/cn/depth", "spout:KinectDepth", 1.0),
    ]


@pytest.mark.parametrize(
    ("models", "sources", "named"),
    [
        (["", "cn"], ["canny", "canny"], "fill the ControlNet slots in order"),
        (["cn@v2", ""], ["canny", ""], "has an @, which the bridge reads as a separator"),
    ],
)
def test_bad_slots_are_refused_with_a_sentence(models, sources, named):
    with pytest.raises(ValueError, match=named):
        sdb_osc.controlnet_entries(models, sources, [1.0, 1.0])


@pytest.fixture
def td() -> Iterator[td_standin.Root]:
    with td_standin.touchdesigner() as root:
        yield root


@pytest.fixture
def one_controlnet() -> Iterator[tuple[OscServer, ParamStore]]:
    """A bridge's OSC server that was started with one ControlNet."""
    store = ParamStore(families=controlnet_families([ControlNetEntry("cn")]))
    with OscServer(store, port=0) as server:
        yield server, store


def test_the_controlnet_page_sends_the_values_of_the_slots_in_use(
    td, tmp_path: Path, one_controlnet
):
    server, store = one_controlnet
    sys.modules.pop("build_component", None)
    comp = importlib.import_module("build_component").build(td.project, tmp_path / "c.tox")
    try:
        comp.par.Streamname = f"td{os.getpid() % 100000}"
        comp.par.Feedbackport = free_udp_port()
        comp.par.Oscport = server.address[1]
        page = next(page for page in comp.customPages if page.name == "ControlNet")
        assert [par.name for par in page.pars][:6] == [
            "Controlnet0model",
            "Controlnet0source",
            "Controlnet0scale",
            "Controlnet0enable",
            "Controlnet0cannylow",
            "Controlnet0cannyhigh",
        ]
        comp.par.Controlnet0model = "synthetic:controlnet-tiny"
        comp.par.Controlnet0scale = 0.4
        comp.par.Controlnet0enable = False
        comp.par.Controlnet1cannylow = 20.0  # slot 1 has no model: nothing goes out for it
        assert wait_until(lambda: store.get("controlnet_0_enable") is False)
        assert store.get("controlnet_0_scale") == pytest.approx(0.4)
        assert server.stats.errors == 0
        # What Start runs: the slot in use, at the scale the page shows.
        command = sdb_process.bridge_command(comp.extensions[0]._settings())
        assert list(parsed_run_settings(command).controlnet) == [
            "synthetic:controlnet-tiny@canny@0.4"
        ]
    finally:
        comp.Shutdown()
