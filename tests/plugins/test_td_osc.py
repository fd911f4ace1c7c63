"""The component's parameter-to-OSC mapping (toe/sdb_osc.py), checked against the bridge itself."""

from __future__ import annotations

import pytest
import sdb_osc

from bridge.control import OscClient, OscServer, ParamStore
from bridge.control.params import LORA_SCALES, PARAMS_BY_ADDRESS, Kind
from tests.control.helpers import wait_until


@pytest.mark.parametrize("live", sdb_osc.LIVE_PARAMS, ids=lambda live: live.par)
def test_every_live_parameter_matches_the_bridge_schema(live: sdb_osc.LiveParam) -> None:
    schema = PARAMS_BY_ADDRESS[live.address]
    if live.kind == "int_list":
        assert schema.kind is Kind.INT_LIST
        assert tuple(sdb_osc.parse_t_index(live.default)) == schema.default
        return
    expected_kind = {
        "str": Kind.STRING,
        "float": Kind.FLOAT,
        "int": Kind.INT,
        "toggle": Kind.BOOL,
        "menu": Kind.CHOICE,
    }[live.kind]
    assert schema.kind is expected_kind
    assert live.default == schema.default
    assert live.choices == schema.choices
    if live.kind in ("float", "int"):
        assert (live.minimum, live.maximum) == (schema.minimum, schema.maximum)
        assert live.maximum_exclusive == schema.maximum_exclusive


def test_every_live_setting_of_the_bridge_has_a_component_parameter() -> None:
    from bridge.control.params import PARAMS

    covered = {live.address for live in sdb_osc.LIVE_PARAMS}
    assert [p.address for p in PARAMS if p.address not in covered] == []


def test_every_default_message_is_accepted_by_the_bridge_schema() -> None:
    for live in sdb_osc.LIVE_PARAMS:
        address, args = sdb_osc.osc_message(live, live.default)
        assert PARAMS_BY_ADDRESS[address].from_osc(args) is not None


def test_values_become_the_osc_arguments_the_bridge_expects() -> None:
    by_par = sdb_osc.LIVE_PARAMS_BY_PAR
    assert sdb_osc.osc_message(by_par["Prompt"], "a forest") == ("/sd/prompt", ["a forest"])
    assert sdb_osc.osc_message(by_par["Delta"], 0.5) == ("/sd/delta", [0.5])
    assert sdb_osc.osc_message(by_par["Seed"], 42.0) == ("/sd/seed", [42])
    assert sdb_osc.osc_message(by_par["Filterenable"], True) == ("/sd/filter/enable", [1])
    assert sdb_osc.osc_message(by_par["Tindex"], "20 35, 45") == ("/sd/t_index", [20, 35, 45])
    assert sdb_osc.osc_message(by_par["Cfg"], "full") == ("/sd/cfg", ["full"])


@pytest.mark.parametrize(
    ("par", "value", "named"),
    [
        ("Tindex", "45, 32", "strictly increasing"),
        ("Tindex", "1 2 3 4 5 6 7 8 9", "1 to 8"),
        ("Tindex", "a, b", "whole numbers"),
        ("Tindex", "", "whole numbers"),
        ("Delta", 5.5, "out of range"),
        ("Delta", float("nan"), "out of range"),
        ("Filterthreshold", 1.0, "below 1"),
        ("Seed", 1.5, "whole number"),
        ("Cfg", "sometimes", "pick none, full, self, initialize"),
        ("Prompt", "x" * 1001, "1000"),
    ],
)
def test_bad_values_are_refused_with_a_sentence_naming_the_fix(
    par: str, value: object, named: str
) -> None:
    with pytest.raises(ValueError, match=named) as refused:
        sdb_osc.osc_message(sdb_osc.LIVE_PARAMS_BY_PAR[par], value)
    sentence = str(refused.value)
    assert sentence.endswith(".") and sentence.count(". ") == 0


def test_all_messages_keeps_the_good_and_reports_the_bad() -> None:
    messages, refusals = sdb_osc.all_messages({"Delta": 0.3, "Tindex": "9, 3", "Seed": 7})
    assert messages == [("/sd/delta", [0.3]), ("/sd/seed", [7])]
    assert len(refusals) == 1 and "T-index" in refusals[0]


def test_messages_sent_to_the_real_server_change_its_store(
    server: OscServer, store: ParamStore
) -> None:
    values = {"Prompt": "neon rain", "Delta": 0.25, "Tindex": "10, 20, 30", "Pause": True}
    messages, refusals = sdb_osc.all_messages(values)
    assert refusals == []
    with OscClient(*server.address) as client:
        client.send_bundle(messages)
    assert wait_until(lambda: store.get("prompt") == "neon rain")
    assert store.get("delta") == 0.25
    assert store.get("t_index_list") == (10, 20, 30)
    assert store.get("pause") is True


def test_status_messages_fill_the_read_only_parameters() -> None:
    assert sdb_osc.status_update("/sd/status/fps", [29.5]) == ("Fps", 29.5)
    assert sdb_osc.status_update("/sd/status/latency_ms", [12.0]) == ("Latency", 12.0)
    assert sdb_osc.status_update("/sd/status/drops", [3]) == ("Drops", 3.0)
    assert sdb_osc.status_update("/sd/value", ["/sd/delta", 1.0]) is None
    assert sdb_osc.status_update("/sd/status/fps", ["fast"]) is None


def test_error_replies_give_their_sentence() -> None:
    sentence = "/sd/delta got 9.0; send a float from 0.0 to 5.0."
    assert sdb_osc.error_sentence("/sd/error", ["/sd/delta", sentence]) == sentence
    assert sdb_osc.error_sentence("/sd/status/fps", [1.0]) is None


def test_each_lora_slot_scale_matches_the_bridge_lora_family() -> None:
    for slot, lora in enumerate(sdb_osc.LORA_PARAMS):
        assert lora.address == LORA_SCALES.address.format(index=slot)
        assert (lora.minimum, lora.maximum) == (LORA_SCALES.minimum, LORA_SCALES.maximum)


def test_lora_scales_go_only_to_slots_with_a_file_and_the_bridge_takes_them() -> None:
    store = ParamStore(families={LORA_SCALES: [1.0]})
    messages = sdb_osc.lora_messages(["style.safetensors", ""], [0.5, 1.5])
    assert messages == [("/sd/lora/0/scale", [0.5])]
    for address, args in messages:
        assert store.param_at(address).from_osc(args) == 0.5


@pytest.mark.parametrize(
    ("files", "scales", "named"),
    [
        (["", "style.safetensors"], [1.0, 1.0], "in order"),
        (["a.safetensors", ""], [2.5, 1.0], "-2"),
    ],
)
def test_bad_lora_slots_are_refused_with_a_sentence(files, scales, named) -> None:
    with pytest.raises(ValueError, match=named):
        sdb_osc.lora_messages(files, scales)
