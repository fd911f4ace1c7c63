"""The schema: coercion rules, refusals, and the rules that tie parameters together."""

from __future__ import annotations

import math

import numpy as np
import pytest

from bridge.control.params import (
    PARAMS,
    PARAMS_BY_NAME,
    SETTINGS,
    SETTINGS_BY_KEY,
    Kind,
    ParamError,
    check_together,
    default_values,
    find_param,
)


def test_every_default_is_valid_for_its_own_param() -> None:
    for param in PARAMS:
        assert param.validate(param.default) == param.default
    check_together(default_values(), ())


def test_names_and_addresses_are_unique_and_under_sd() -> None:
    assert len({p.name for p in PARAMS}) == len(PARAMS)
    assert len({p.address for p in PARAMS}) == len(PARAMS)
    assert all(p.address.startswith("/sd/") for p in PARAMS)


def test_requested_addresses_and_defaults() -> None:
    expected = {
        "prompt": ("/sd/prompt", "a psychedelic painting, vivid colours"),
        "negative_prompt": ("/sd/negative_prompt", ""),
        "delta": ("/sd/delta", 1.0),
        "guidance_scale": ("/sd/guidance", 1.2),
        "seed": ("/sd/seed", 2),
        "t_index_list": ("/sd/t_index", (32, 45)),
        "cfg_type": ("/sd/cfg", "self"),
        "similarity_filter": ("/sd/filter/enable", False),
        "similarity_threshold": ("/sd/filter/threshold", 0.98),
        "max_skip_frames": ("/sd/filter/max_skip", 10),
        "pause": ("/sd/pause", False),
        "prompt_fade": ("/sd/prompt/fade", 0.0),
        "seed_fade": ("/sd/seed/fade", 0.0),
        "num_inference_steps": ("/sd/num_inference_steps", 50),
    }
    for name, (address, default) in expected.items():
        assert (PARAMS_BY_NAME[name].address, PARAMS_BY_NAME[name].default) == (address, default)


def test_only_batch_layout_and_bank_size_params_change_shapes() -> None:
    assert {p.name for p in PARAMS if p.changes_shapes} == {
        "t_index_list",
        "cfg_type",
        "feature_bank_size",
    }


@pytest.mark.parametrize(
    ("name", "given", "stored"),
    [
        ("delta", 2, 2.0),
        ("delta", np.float32(0.5), 0.5),
        ("seed", 2.0, 2),
        ("seed", np.int64(7), 7),
        ("max_skip_frames", 600, 600),
        ("pause", True, True),
        ("pause", 1, True),
        ("pause", 0, False),
        ("pause", 1.0, True),
        ("cfg_type", "full", "full"),
        ("t_index_list", [0, 10.0, 49], (0, 10, 49)),
        ("similarity_threshold", 0.0, 0.0),
        ("prompt", "x" * 1000, "x" * 1000),
    ],
)
def test_accepted_values_are_coerced_to_the_param_type(name, given, stored) -> None:
    value = PARAMS_BY_NAME[name].validate(given)
    assert value == stored
    assert type(value) is type(stored)


@pytest.mark.parametrize(
    ("name", "given"),
    [
        ("delta", math.nan),
        ("delta", math.inf),
        ("delta", -math.inf),
        ("delta", 5.0001),
        ("delta", -0.1),
        ("delta", "1.0"),
        ("delta", True),
        ("delta", None),
        ("seed", 2.5),
        ("seed", -1),
        ("seed", 2**31),
        ("seed", math.nan),
        ("seed", False),
        ("pause", 2),
        ("pause", 0.5),
        ("pause", "T"),
        ("cfg_type", "SELF"),
        ("cfg_type", 1),
        ("similarity_threshold", 1.0),
        ("max_skip_frames", 601),
        ("prompt", "x" * 1001),
        ("prompt", b"bytes"),
        ("t_index_list", []),
        ("t_index_list", [45, 32]),
        ("t_index_list", [32, 32]),
        ("t_index_list", list(range(9))),
        ("t_index_list", [1.5]),
        ("t_index_list", "32 45"),
    ],
)
def test_refused_values_raise_one_sentence_naming_the_address(name, given) -> None:
    param = PARAMS_BY_NAME[name]
    with pytest.raises(ParamError) as raised:
        param.validate(given)
    sentence = raised.value.sentence
    assert raised.value.address == param.address
    assert sentence.startswith(f"{param.address} got ")
    assert "; send " in sentence and sentence.endswith(".")
    assert "\n" not in sentence


def test_over_long_string_is_refused_not_truncated_and_the_error_stays_short() -> None:
    with pytest.raises(ParamError) as raised:
        PARAMS_BY_NAME["prompt"].validate("y" * 5000)
    assert "5000-character string" in raised.value.sentence
    assert "1000 characters" in raised.value.sentence
    assert len(raised.value.sentence) < 200


def test_osc_arguments_need_exactly_one_value_except_for_the_list() -> None:
    seed = PARAMS_BY_NAME["seed"]
    assert seed.from_osc([5]) == 5
    with pytest.raises(ParamError, match="no argument"):
        seed.from_osc([])
    with pytest.raises(ParamError, match="2 arguments"):
        seed.from_osc([5, 6])
    t_index = PARAMS_BY_NAME["t_index_list"]
    assert t_index.from_osc([20, 35, 45]) == (20, 35, 45)
    assert t_index.from_osc([[20, 35]]) == (20, 35)


def test_values_go_out_as_plain_osc_arguments() -> None:
    assert PARAMS_BY_NAME["t_index_list"].to_osc((32, 45)) == [32, 45]
    assert PARAMS_BY_NAME["pause"].to_osc(True) == [1]
    assert PARAMS_BY_NAME["delta"].to_osc(0.5) == [0.5]


def test_t_index_entries_must_index_into_the_schedule() -> None:
    values = default_values() | {"num_inference_steps": 40}
    with pytest.raises(ParamError) as raised:
        check_together(values, {"num_inference_steps"})
    assert raised.value.address == "/sd/num_inference_steps"
    with pytest.raises(ParamError) as raised:
        check_together(values, {"t_index_list"})
    assert raised.value.address == "/sd/t_index"
    check_together(default_values() | {"num_inference_steps": 46}, {"num_inference_steps"})


def test_every_kind_is_used_by_some_setting() -> None:
    assert {p.kind for p in SETTINGS} == set(Kind)


def test_a_string_list_takes_non_empty_strings_only() -> None:
    output = SETTINGS_BY_KEY["output"]
    assert output.validate(["null", "shm:a"]) == ("null", "shm:a")
    for bad in (["null", ""], "null", ["null", 3], ["x"] * 17):
        with pytest.raises(ParamError, match="output got"):
            output.validate(bad)


def test_an_int_that_must_be_a_multiple_says_so() -> None:
    width = SETTINGS_BY_KEY["width"]
    assert width.validate(264) == 264
    with pytest.raises(ParamError) as raised:
        width.validate(260)
    assert raised.value.sentence == "width got 260; use an int from 8 to 4096, a multiple of 8."


def test_find_param_takes_names_aliases_and_addresses() -> None:
    for text in ("guidance_scale", "guidance", "/sd/guidance"):
        assert find_param(text) is PARAMS_BY_NAME["guidance_scale"]
    assert find_param("filter/enable") is PARAMS_BY_NAME["similarity_filter"]
    assert find_param("filter_enable") is PARAMS_BY_NAME["similarity_filter"]
    assert find_param("width") is None  # fixed at start: not a live parameter
    assert find_param("/sd/nothing") is None
