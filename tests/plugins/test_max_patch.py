"""plugins/music/sd-bridge.maxpat, checked as data: Max itself cannot run here.

The checks are what would break the patch when Max opens it, or make it send what the bridge
refuses: dangling or out-of-range patch cords, boxes whose inlets and outlets do not match the
Max objects they name, OSC addresses the bridge does not know, a prompt path that does not
reach `udpsend`, and a prompt list that drifted from the Pure Data patch's.
"""

from __future__ import annotations

import json
import re
from collections import defaultdict
from typing import Any

import pytest

from bridge.control import ParamStore
from bridge.control.params import LORA_SCALES
from tests.plugins.helpers import MUSIC

PATCH = MUSIC / "sd-bridge.maxpat"

# Max objects the patch uses: inlets and outlet count, from the Max reference.
MAX_OBJECTS = {
    "udpsend": (1, 0),
    "coll": (1, 4),
    "midiin": (1, 1),
    "midiparse": (1, 7),
    "unpack": (1, None),  # one outlet per argument
    "stripnote": (2, 2),
    "t": (1, None),
    "tosymbol": (1, 1),
    "prepend": (2, 1),
    "random": (2, 1),
}
UI_OBJECTS = {"message": (2, 1), "button": (1, 1), "number": (1, 2), "flonum": (1, 2)}


@pytest.fixture(scope="module")
def boxes() -> dict[str, dict[str, Any]]:
    patcher = json.loads(PATCH.read_text(encoding="utf-8"))["patcher"]
    return {entry["box"]["id"]: entry["box"] for entry in patcher["boxes"]}


@pytest.fixture(scope="module")
def cords() -> list[tuple[str, int, str, int]]:
    patcher = json.loads(PATCH.read_text(encoding="utf-8"))["patcher"]
    return [
        (*line["patchline"]["source"], *line["patchline"]["destination"])
        for line in patcher["lines"]
    ]


def test_every_box_has_the_inlets_and_outlets_of_its_max_object(
    boxes: dict[str, dict[str, Any]],
) -> None:
    for box in boxes.values():
        assert box["numoutlets"] == len(box.get("outlettype", [])), box["id"]
        if box["maxclass"] == "comment":
            continue
        if box["maxclass"] == "newobj":
            words = box["text"].split()
            inlets, outlets = MAX_OBJECTS[words[0]]
            outlets = len(words) - 1 if outlets is None else outlets
        else:
            inlets, outlets = UI_OBJECTS[box["maxclass"]]
        assert (box["numinlets"], box["numoutlets"]) == (inlets, outlets), box.get("text")


def test_every_cord_joins_an_existing_outlet_to_an_existing_inlet(
    boxes: dict[str, dict[str, Any]], cords: list[tuple[str, int, str, int]]
) -> None:
    for source, outlet, destination, inlet in cords:
        assert outlet < boxes[source]["numoutlets"], (source, outlet)
        assert inlet < boxes[destination]["numinlets"], (destination, inlet)


def test_every_address_sent_is_one_the_bridge_takes(boxes: dict[str, dict[str, Any]]) -> None:
    addresses = [
        box["text"].split()[1]
        for box in boxes.values()
        if box["maxclass"] == "newobj" and box["text"].startswith("prepend ")
    ]
    assert sorted(addresses) == [
        "/sd/delta",
        "/sd/lora/0/scale",
        "/sd/lora/1/scale",
        "/sd/prompt",
        "/sd/prompt/fade",
        "/sd/seed",
        "/sd/seed/fade",
    ]
    # A bridge that loaded two LoRA files live takes every one of them.
    store = ParamStore(families={LORA_SCALES: [1.0, 1.0]})
    assert all(store.param_at(address) is not None for address in addresses)


@pytest.mark.parametrize("index", [0, 1])
def test_each_lora_number_box_spans_the_bridges_range_and_feeds_its_scale(
    boxes: dict[str, dict[str, Any]], cords: list[tuple[str, int, str, int]], index: int
) -> None:
    prepend = next(
        box["id"] for box in boxes.values() if box.get("text") == f"prepend /sd/lora/{index}/scale"
    )
    (number,) = [source for source, _, destination, _ in cords if destination == prepend]
    assert boxes[number]["maxclass"] == "flonum"
    assert (boxes[number]["minimum"], boxes[number]["maximum"]) == (
        LORA_SCALES.minimum,
        LORA_SCALES.maximum,
    )


def test_every_object_feeds_udpsend_on_the_bridge_port(
    boxes: dict[str, dict[str, Any]], cords: list[tuple[str, int, str, int]]
) -> None:
    following: dict[str, set[str]] = defaultdict(set)
    for source, _, destination, _ in cords:
        following[source].add(destination)

    def reaches(start: str, goal: str) -> bool:
        seen, pending = set(), [start]
        while pending:
            node = pending.pop()
            if node == goal:
                return True
            if node not in seen:
                seen.add(node)
                pending.extend(following[node])
        return False

    by_text = {box["text"]: box["id"] for box in boxes.values() if "text" in box}
    udpsend = by_text["udpsend 127.0.0.1 7000"]
    for box in boxes.values():
        if box["maxclass"] != "comment" and box["id"] != udpsend:
            assert reaches(box["id"], udpsend), box.get("text", box["maxclass"])
    # Each prompt goes out as one string: the coll's entry passes tosymbol before prepend.
    assert following[by_text["coll sd-prompts"]] == {by_text["tosymbol"]}
    assert following[by_text["tosymbol"]] == {by_text["prepend /sd/prompt"]}


def test_the_prompt_list_matches_the_pure_data_patch(boxes: dict[str, dict[str, Any]]) -> None:
    coll = next(box for box in boxes.values() if box.get("text") == "coll sd-prompts")
    assert coll["saved_object_attributes"]["embed"] == 1
    entries = sorted(coll["coll_data"]["data"], key=lambda entry: entry["key"])
    max_prompts = [entry["value"] for entry in entries]
    assert all(len(value) == 1 for value in max_prompts)  # one symbol each: one OSC string

    pd_text = (MUSIC / "sd-bridge.pd").read_text(encoding="utf-8")
    stored = re.search(r"^#A set (.*);$", pd_text, re.MULTILINE).group(1)
    pd_prompts = [line.replace(" \\,", ",").strip() for line in stored.split("\\;") if line.strip()]
    assert [value[0] for value in max_prompts] == pd_prompts
