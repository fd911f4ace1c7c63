"""ControlNets over OSC: scale, enable and canny thresholds per ControlNet loaded, and no others."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from bridge.control import OscClient, OscServer, ParamStore
from bridge.control.params import PARAMS, family_table_markdown
from bridge.runtime.controlnets import ControlNetEntry, controlnet_families
from tests.control.helpers import receive_all
from tests.runtime.helpers import ROOT, load_script

ADDRESSES = [
    "/sd/controlnet/0/scale",
    "/sd/controlnet/1/scale",
    "/sd/controlnet/0/enable",
    "/sd/controlnet/1/enable",
    "/sd/controlnet/0/canny/low",
    "/sd/controlnet/1/canny/low",
    "/sd/controlnet/0/canny/high",
    "/sd/controlnet/1/canny/high",
]


@pytest.fixture
def controlnet_store() -> ParamStore:
    """A store for a bridge started with two ControlNets, at 0.8 and 1.0."""
    entries = [ControlNetEntry("a", "canny", 0.8), ControlNetEntry("b", "shm:depth", 1.0)]
    return ParamStore(families=controlnet_families(entries))


@pytest.fixture
def controlnet_client(controlnet_store: ParamStore) -> Iterator[OscClient]:
    with (
        OscServer(controlnet_store, port=0) as server,
        OscClient(*server.address, local_host="127.0.0.1", timeout=2.0) as client,
    ):
        yield client


def test_list_and_get_carry_each_controlnets_parameters_after_the_schema(controlnet_client):
    controlnet_client.send("/sd/list")
    described = {args[0]: args[1:] for _, args in receive_all(controlnet_client)}
    assert list(described) == [p.address for p in PARAMS] + ADDRESSES
    assert described["/sd/controlnet/0/scale"] == ["f", 0.0, 2.0, pytest.approx(0.8)]
    assert described["/sd/controlnet/1/enable"] == ["i", 0, 1, 1]
    assert described["/sd/controlnet/1/canny/low"] == ["f", 0.0, 2040.0, 100.0]
    assert described["/sd/controlnet/0/canny/high"] == ["f", 0.0, 2040.0, 200.0]
    controlnet_client.send("/sd/get")
    assert [args[0] for _, args in receive_all(controlnet_client)][-8:] == ADDRESSES


def test_each_value_changes_in_the_store_and_reads_back(controlnet_store, controlnet_client):
    controlnet_client.send("/sd/controlnet/1/scale", 0.25)
    controlnet_client.send("/sd/controlnet/0/enable", False)
    controlnet_client.send("/sd/controlnet/0/canny/low", 40)
    assert controlnet_client.get("/sd/controlnet/1/scale") == [0.25]
    controlnet_client.send("/sd/get", "controlnet_0_enable")
    assert controlnet_client.receive() == ("/sd/value", ["/sd/controlnet/0/enable", 0])
    assert controlnet_store.get("controlnet_0_canny_low") == 40.0
    assert controlnet_store.get("controlnet_0_enable") is False


@pytest.mark.parametrize(
    ("address", "value", "allowed"),
    [
        ("/sd/controlnet/0/scale", 2.5, "a float from 0.0 to 2.0"),
        ("/sd/controlnet/0/scale", float("nan"), "a float from 0.0 to 2.0"),
        ("/sd/controlnet/1/enable", 2, "0 or 1 (or T/F)"),
        ("/sd/controlnet/0/canny/high", -1.0, "a float from 0.0 to 2040.0"),
    ],
)
def test_a_value_out_of_range_is_refused_and_the_old_one_kept(
    controlnet_store, controlnet_client, address, value, allowed
):
    before = controlnet_client.get(address)
    controlnet_client.send(address, value)
    error = controlnet_client.receive()
    assert error is not None and error[0] == "/sd/error" and error[1][0] == address
    assert allowed in error[1][1]
    assert controlnet_client.get(address) == before


@pytest.mark.parametrize("tail", ["scale", "enable", "canny/low", "canny/high"])
def test_an_index_out_of_range_is_one_sentence_naming_the_allowed_ones(controlnet_client, tail):
    address = f"/sd/controlnet/2/{tail}"
    controlnet_client.send(address, 1)
    assert controlnet_client.receive() == (
        "/sd/error",
        [
            address,
            f"{address} names ControlNet 2, but only 2 ControlNets are loaded live; "
            "send an index from 0 to 1.",
        ],
    )
    assert controlnet_client.get("/sd/controlnet/1/scale") == [1.0]  # still serving


def test_without_controlnets_an_address_says_how_to_give_one(client):
    client.send("/sd/controlnet/0/enable", 1)
    error = client.receive()
    assert error is not None and error[1] == [
        "/sd/controlnet/0/enable",
        "/sd/controlnet/0/enable names ControlNet 0, but no ControlNet is loaded live; give "
        "ControlNets at start (the controlnet setting).",
    ]


def test_a_start_scale_out_of_range_is_refused_when_the_store_is_made():
    entries = [ControlNetEntry("a", scale=0.5), ControlNetEntry("b", scale=3.0)]
    with pytest.raises(ValueError, match="ControlNet 1 starts at 3.0; use a float from 0.0 to 2.0"):
        ParamStore(families=controlnet_families(entries))


def test_the_docs_table_has_a_row_per_family_and_enable_re_captures():
    rows = family_table_markdown().splitlines()[2:]
    enable = next(row for row in rows if row.startswith("| `/sd/controlnet/<index>/enable`"))
    assert "| `i`, `T` or `F` | 0/1 or T/F | yes |" in enable
    scale = next(row for row in rows if row.startswith("| `/sd/controlnet/<index>/scale`"))
    assert "| 0.0 – 2.0 | no |" in scale


def test_docs_osc_md_carries_the_generated_family_table():
    generator = load_script("gen_osc_doc.py")
    text = (ROOT / "docs" / "osc.md").read_text(encoding="utf-8")
    start, end = generator.FAMILY_START, generator.FAMILY_END
    assert generator.with_table(text, family_table_markdown(), start, end) == text, (
        "docs/osc.md is out of date; run python scripts/gen_osc_doc.py"
    )
