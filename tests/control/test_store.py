"""The store: validated, versioned, and never seen half-updated."""

from __future__ import annotations

import threading

import pytest

from bridge.control import ParamError, ParamStore
from bridge.control.params import PARAMS, check_together


def test_starts_with_the_defaults_at_version_zero(store: ParamStore) -> None:
    assert store.version == 0
    assert store.get("t_index_list") == (32, 45)
    assert store.snapshot().changed_since(-1) == {p.name for p in PARAMS}


def test_initial_values_are_validated() -> None:
    assert ParamStore({"seed": 9.0}).get("seed") == 9
    with pytest.raises(ParamError):
        ParamStore({"delta": -1})
    with pytest.raises(ParamError):
        ParamStore({"num_inference_steps": 10})


def test_set_stores_the_coerced_value_and_bumps_the_version(store: ParamStore) -> None:
    store.set("seed", 7.0)
    assert store.get("seed") == 7
    assert store.version == 1


def test_setting_the_same_value_is_not_a_change(store: ParamStore) -> None:
    store.set("delta", 1)
    assert store.version == 0


def test_refused_value_leaves_store_and_version_untouched(store: ParamStore) -> None:
    with pytest.raises(ParamError):
        store.set("delta", float("nan"))
    assert store.get("delta") == 1.0
    assert store.version == 0


def test_unknown_name_is_refused(store: ParamStore) -> None:
    with pytest.raises(ParamError, match="unknown parameter 'strength'"):
        store.set("strength", 1.0)
    with pytest.raises(ParamError):
        store.get("strength")


def test_set_many_applies_all_or_nothing(store: ParamStore) -> None:
    with pytest.raises(ParamError):
        store.set_many({"seed": 5, "delta": 99.0})
    assert store.get("seed") == 2
    store.set_many({"seed": 5, "delta": 0.5})
    assert (store.get("seed"), store.get("delta"), store.version) == (5, 0.5, 1)


def test_set_many_checks_the_final_state_not_each_step(store: ParamStore) -> None:
    store.set_many({"num_inference_steps": 20, "t_index_list": [5, 15]})
    assert store.get("num_inference_steps") == 20
    with pytest.raises(ParamError, match="/sd/t_index"):
        store.set("t_index_list", [5, 25])


def test_snapshot_is_immutable_and_outlives_later_changes(store: ParamStore) -> None:
    before = store.snapshot()
    store.set("prompt", "a forest")
    assert before["prompt"] == "a psychedelic painting, vivid colours"
    assert store.snapshot()["prompt"] == "a forest"
    with pytest.raises(TypeError):
        before.values["prompt"] = "x"  # type: ignore[index]


def test_changed_since_names_exactly_what_changed_after_a_version(store: ParamStore) -> None:
    store.set("seed", 3)
    seen = store.snapshot()
    store.set("delta", 0.2)
    store.set_many({"prompt": "a", "seed": 3})
    latest = store.snapshot()
    assert latest.changed_since(seen.version) == {"delta", "prompt"}
    assert latest.changed_since(latest.version) == frozenset()


def test_readers_never_see_half_of_a_set_many() -> None:
    store = ParamStore({"seed": 10})
    stop = threading.Event()

    def write() -> None:
        n = 0
        while not stop.is_set():
            n += 1
            steps = 10 + n % 40
            store.set_many(
                {
                    "seed": n,
                    "max_skip_frames": n % 600,
                    "num_inference_steps": steps if n % 2 else 50,
                    "t_index_list": [0, steps - 1],
                }
            )

    writer = threading.Thread(target=write)
    writer.start()
    try:
        for _ in range(20000):
            snap = store.snapshot()
            assert snap["max_skip_frames"] == snap["seed"] % 600
            check_together(snap.values, ())
    finally:
        stop.set()
        writer.join()
    assert store.version > 0
