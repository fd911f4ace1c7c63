"""Fuzzing the OSC server: any arguments to any address, and datagrams that are not OSC at all.

Each argument test checks the server against an independent statement of the rules in
docs/osc.md: a message the rules allow is stored exactly, any other is answered with an error
and changes nothing, and whatever happens the stored values stay valid.
"""

from __future__ import annotations

import logging
import math
import random
import struct

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from pythonosc.osc_message_builder import OscMessageBuilder

from bridge.control import OscClient, OscServer, ParamStore
from bridge.control.osc_datagram import MAX_BUNDLE_DEPTH
from bridge.control.osc_server import MAX_SHOWN_ADDRESS, shown_address
from bridge.control.params import PARAMS, PARAMS_BY_ADDRESS, Kind, Param, check_together
from tests.control.helpers import exchange, receive_all

FUZZ = settings(
    max_examples=200,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

REFUSED = object()

text = st.text(
    alphabet=st.characters(exclude_categories=("Cs",), exclude_characters="\x00"),
    max_size=1100,
)
scalar = st.one_of(
    st.integers(-(2**63), 2**63 - 1),
    st.integers(-3, 1100),
    st.floats(width=32),
    st.sampled_from([0.0, 1.0, 2.0, 0.5, 45.0, math.nan, math.inf, -math.inf]),
    text,
    st.sampled_from(["none", "full", "self", "initialize", "a forest"]),
    st.booleans(),
    st.none(),
    st.binary(min_size=1, max_size=16),
)
argument = st.one_of(scalar, st.lists(st.integers(-3, 60), max_size=9))
arguments = st.one_of(
    st.lists(argument, max_size=3),
    st.lists(st.integers(-2, 60), max_size=10),
    st.lists(st.floats(width=32, min_value=-2, max_value=60), max_size=10),
)


def near_valid(param: Param) -> st.SearchStrategy[list]:
    """Arguments around the edges of what `param` allows, most of them valid."""
    if param.kind is Kind.FLOAT:
        low, high = int(param.minimum) - 1, int(param.maximum) + 1
        one = st.one_of(st.floats(low, high, width=32), st.integers(low, high))
    elif param.kind is Kind.INT:
        low, high = int(param.minimum) - 1, int(param.maximum) + 1
        one = st.one_of(
            st.integers(low, high),
            st.integers(low, min(high, 2000)),
            st.integers(low, min(high, 2000)).map(float),
        )
    elif param.kind is Kind.BOOL:
        one = st.sampled_from([True, False, 0, 1, 2, -1, 0.0, 1.0, 0.5])
    elif param.kind is Kind.STRING:
        one = st.one_of(text, st.text(alphabet="ab ", min_size=995, max_size=1005))
    elif param.kind is Kind.CHOICE:
        one = st.sampled_from([*param.choices, "SELF", ""])
    else:
        entries = st.lists(st.integers(-1, 55), min_size=1, max_size=9, unique=True)
        return st.one_of(entries.map(sorted), entries.map(lambda e: [sorted(e)]))
    return st.one_of(one.map(lambda value: [value]), st.lists(one, min_size=1, max_size=2))


def whole(value: object) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and math.isfinite(value) and value == int(value):
        return int(value)
    return None


def expected(param: Param, args: list, steps: int, t_index: tuple[int, ...]) -> object:
    """What the rules say `args` sent to `param.address` must store, or REFUSED."""
    if param.kind is Kind.INT_LIST:
        entries = args[0] if len(args) == 1 and isinstance(args[0], list) else args
        ints = [whole(entry) for entry in entries]
        if not 1 <= len(ints) <= 8 or None in ints:
            return REFUSED
        if any(not 0 <= n < steps for n in ints) or ints != sorted(set(ints)):
            return REFUSED
        return tuple(ints)
    if len(args) != 1:
        return REFUSED
    (value,) = args
    if param.kind is Kind.FLOAT:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return REFUSED
        if not math.isfinite(value) or value < param.minimum or value > param.maximum:
            return REFUSED
        if param.maximum_exclusive and value == param.maximum:
            return REFUSED
        return float(value)
    if param.kind is Kind.INT:
        number = whole(value)
        if number is None or not param.minimum <= number <= param.maximum:
            return REFUSED
        if param.name == "num_inference_steps" and number <= max(t_index):
            return REFUSED
        return number
    if param.kind is Kind.BOOL:
        if isinstance(value, bool):
            return value
        return bool(whole(value)) if whole(value) in (0, 1) else REFUSED
    if param.kind is Kind.STRING:
        return value if isinstance(value, str) and len(value) <= 1000 else REFUSED
    return value if isinstance(value, str) and value in param.choices else REFUSED


def assert_all_valid(store: ParamStore) -> None:
    snap = store.snapshot()
    for param in PARAMS:
        assert param.validate(snap[param.name]) == snap[param.name]
    check_together(snap.values, ())


@FUZZ
@given(data=st.data())
def test_any_arguments_to_any_address(
    data: st.DataObject, store: ParamStore, client: OscClient
) -> None:
    param = data.draw(st.sampled_from(PARAMS), label="param")
    near_edges = data.draw(st.integers(0, 3), label="near_edges") < 3
    args = data.draw(near_valid(param) if near_edges else arguments, label="args")
    before = store.snapshot()
    want = expected(param, args, before["num_inference_steps"], before["t_index_list"])
    event("refused" if want is REFUSED else "stored")
    replies = exchange(client, param.address, args, param.address)
    errors = [reply for reply in replies if reply[0] == "/sd/error"]
    if want is REFUSED:
        assert [args[0] for _, args in errors] == [param.address]
        assert store.snapshot().values == before.values
    else:
        assert errors == []
        assert store.get(param.name) == want
        assert replies[-1][1][1:] == param.to_osc(want)
    assert_all_valid(store)


@FUZZ
@given(address=st.text(min_size=1, max_size=40).map(lambda s: "/" + s.replace("\x00", "")))
def test_unknown_addresses_are_answered_and_change_nothing(
    address: str, store: ParamStore, client: OscClient
) -> None:
    if address in PARAMS_BY_ADDRESS or address.startswith(("/sd/get", "/sd/list", "/sd/sub")):
        return
    before = store.snapshot()
    replies = exchange(client, address, [1.0], "/sd/seed")
    shown = shown_address(address)
    sentence = f"unknown OSC address {shown}; send /sd/list to get every address this server takes."
    assert replies[0] == ("/sd/error", [shown, sentence])
    assert shown.isprintable() and len(shown) <= MAX_SHOWN_ADDRESS
    assert store.snapshot() is before


def osc_message(address: str, *args: object) -> bytes:
    builder = OscMessageBuilder(address=address)
    for arg in args:
        builder.add_arg(arg)
    return builder.build().dgram


def bundle(*contents: bytes) -> bytes:
    body = b"".join(struct.pack(">i", len(content)) + content for content in contents)
    return b"#bundle\x00" + struct.pack(">II", 0, 1) + body


def nested(depth: int) -> bytes:
    datagram = osc_message("/sd/seed", 9)
    for _ in range(depth):
        datagram = bundle(datagram)
    return datagram


VALID = osc_message("/sd/prompt", "a forest", 1, 2.5)

malformed = st.one_of(
    st.binary(max_size=300),
    st.integers(1, len(VALID) - 1).map(lambda n: VALID[:n]),
    st.binary(max_size=12).map(lambda tags: b"/sd/prompt\x00\x00,s" + tags + b"\x00"),
    st.sampled_from(
        [
            b"",
            b"/sd/seed\x00\x00\x00\x00,i\x00\x00",
            b"/sd/seed\x00\x00\x00\x00i\x00\x00\x00\x00\x00\x00\x01",
            b"/sd/prompt\x00\x00,s\x00\x00\xff\xfe\xfd\x00",
            b"/sd/prompt\x00\x00,b\x00\x00\x7f\xff\xff\xff",
            b"/sd/t_index\x00,[[i\x00\x00\x00\x00\x01",
            b"/sd/t_index\x00,]\x00\x00",
            b"#bundle\x00",
            b"#bundle\x00\x00\x00\x00\x00\x00\x00\x00\x01\xff\xff\xff\xf0/sd/",
            bundle(b"/sd/seed\x00\x00\x00\x00,i\x00"),
            nested(3000),
        ]
    ),
    st.integers(1, 3000).map(nested),
)


@FUZZ
@given(datagram=malformed)
def test_malformed_datagrams_never_stop_the_server(
    datagram: bytes, store: ParamStore, server: OscServer, client: OscClient
) -> None:
    client.send_raw(datagram)
    assert client.get("/sd/seed", timeout=2.0)
    assert_all_valid(store)


def test_unreadable_datagrams_are_counted_and_not_answered(
    server: OscServer, client: OscClient
) -> None:
    for datagram in (VALID[:7], b"\xff\xfe/sd/\x00\x00,i\x00\x00", nested(3000)):
        client.send_raw(datagram)
    client.send("/sd/get", "/sd/seed")
    assert receive_all(client) == [("/sd/value", ["/sd/seed", 2])]
    assert server.stats.malformed == 3


def bundle_at(time_tag: int, *contents: bytes) -> bytes:
    body = b"".join(struct.pack(">i", len(content)) + content for content in contents)
    return b"#bundle\x00" + struct.pack(">Q", time_tag) + body


# Datagrams an outside test found harmful, each sent over UDP: (datagram, refused, malformed).
HOSTILE = {
    "bundle element size -4": (
        b"#bundle\x00" + bytes(8) + struct.pack(">i", -4) + osc_message("/sd/seed", 5)[:20],
        0,
        1,
    ),
    "bundle element past the end": (
        b"#bundle\x00" + bytes(8) + struct.pack(">i", 64) + osc_message("/sd/seed", 5),
        0,
        1,
    ),
    "float tag, no data": (b"/sd/delta\x00\x00\x00,f\x00\x00", 1, 0),
    "two of four float bytes": (b"/sd/delta\x00\x00\x00,f\x00\x00\x3f\x00", 1, 0),
    "unknown tag before a float": (b"/sd/delta\x00\x00\x00,cf\x00\x00\x00\x00A?\x00\x00\x00", 1, 0),
    "bytes after the data": (osc_message("/sd/delta", 0.5) + bytes(4), 1, 0),
    "string padded with junk": (b"/sd/prompt\x00\x00,s\x00\x00ab\x00\x07", 1, 0),
    "65 KB of unknown tags": (b"/sd/delta\x00\x00\x00," + b"c" * 65000 + b"\x00\x00\x00", 1, 0),
    "bundles 400 deep": (nested(400), 0, 1),
    "bundles one too deep": (nested(MAX_BUNDLE_DEPTH + 1), 0, 1),
}


@pytest.mark.parametrize("name", HOSTILE)
def test_hostile_datagrams_change_nothing_and_the_server_keeps_answering(
    name: str, store: ParamStore, server: OscServer, client: OscClient, caplog
) -> None:
    datagram, refused, malformed = HOSTILE[name]
    before = store.snapshot()
    with caplog.at_level(logging.WARNING):
        client.send_raw(datagram)
        assert client.get("/sd/seed", timeout=10.0) == [2]
    assert store.snapshot() is before
    assert (server.stats.errors, server.stats.malformed) == (refused, malformed)
    assert all(r.name.startswith("bridge.") for r in caplog.records)
    assert len(caplog.records) == refused + malformed


def test_bundles_nested_to_the_limit_apply() -> None:
    with OscServer(ParamStore(), port=0) as server, OscClient(*server.address) as client:
        client.send_raw(nested(MAX_BUNDLE_DEPTH))
        assert client.get("/sd/seed", timeout=10.0) == [9]


def test_time_tags_do_not_reorder_the_messages_of_a_datagram(
    store: ParamStore, client: OscClient
) -> None:
    later = bundle_at(2**40, osc_message("/sd/seed", 5))
    sooner = bundle_at(2, osc_message("/sd/seed", 6))
    client.send_raw(bundle_at(1, later, sooner))
    assert client.get("/sd/seed", timeout=10.0) == [6]
    assert store.version == 1


def test_a_mismatched_message_in_a_bundle_is_refused_and_the_rest_applies(
    store: ParamStore, client: OscClient
) -> None:
    broken = b"/sd/delta\x00\x00\x00,cf\x00" + struct.pack(">if", 65, 0.5)
    client.send_raw(bundle(osc_message("/sd/seed", 44), broken))
    reply = client.receive(10.0)
    assert reply is not None and reply[0] == "/sd/error" and reply[1][0] == "/sd/delta"
    assert "type tag 'c' is not one this server reads" in reply[1][1]
    # The refusal goes out while the datagram is read; a round trip waits for it to apply.
    assert client.get("/sd/seed", timeout=10.0) == [44]
    assert (store.get("seed"), store.get("delta")) == (44, 1.0)


def test_addresses_are_escaped_and_cut_in_logs_and_replies(
    server: OscServer, client: OscClient, caplog
) -> None:
    with caplog.at_level(logging.WARNING):
        client.send("/sd/\x1b[2J\nfake line", 1)
        client.send("/" + "u" * 32000, 1)
        first, second = client.receive(10.0), client.receive(10.0)
    assert first is not None and first[1][0] == "/sd/\\x1b[2J\\nfake line"
    assert second is not None and len(second[1][0]) == MAX_SHOWN_ADDRESS
    text = "".join(record.getMessage() for record in caplog.records)
    assert "\x1b" not in text and "\n" not in text and len(text) < 1000


def mutate(rng: random.Random, datagram: bytes) -> bytes:
    """One random change of the kind a broken sender makes: a size, a tag, padding, nesting."""
    data = bytearray(datagram)
    roll = rng.random()
    if roll < 0.3 and data:
        for _ in range(rng.randint(1, 4)):
            data[rng.randrange(len(data))] = rng.choice(
                [0, 0xFF, 0x2C, 0x5B, 0x5D, rng.randrange(256)]
            )
    elif roll < 0.45:
        del data[rng.randrange(len(data) + 1) :]
    elif roll < 0.6:
        data += bytes(rng.choice([1, 2, 3, 4, 8]))
    elif roll < 0.75:
        at = data.find(b",")
        if at >= 0:
            data[at + 1 : at + 1] = rng.choice([b"c", b"f", b"[", b"]", b"i", b"x"])
    elif roll < 0.9:
        size = rng.choice([-4, -1, 0, 3, 2**31 - 1, len(data) + 4, len(data) - 4])
        return b"#bundle\x00" + bytes(8) + struct.pack(">i", size) + bytes(data)
    else:
        depth = rng.choice([1, 2, MAX_BUNDLE_DEPTH - 1, MAX_BUNDLE_DEPTH, MAX_BUNDLE_DEPTH + 1, 50])
        out = bytes(data)
        for _ in range(depth):
            out = bundle(out) if len(out) % 4 == 0 else out + bytes(-len(out) % 4)
        return out
    return bytes(data)


SEEDS = [
    osc_message("/sd/delta", 0.5),
    osc_message("/sd/seed", 77),
    osc_message("/sd/prompt", "a forest at dawn"),
    osc_message("/sd/t_index", [10, 20]),
    osc_message("/sd/filter/enable", True),
    osc_message("/sd/get", "/sd/seed"),
    bundle(osc_message("/sd/num_inference_steps", 30), osc_message("/sd/t_index", 5, 25)),
    bundle(bundle(osc_message("/sd/guidance", 2.0)), osc_message("/sd/cfg", "full")),
]


@pytest.mark.slow
def test_a_hundred_thousand_mutated_datagrams_paced_within_the_buffer(
    store: ParamStore, server: OscServer, client: OscClient, caplog
) -> None:
    rng = random.Random(20261201)
    sender = OscClient(*server.address, local_host="127.0.0.1", timeout=10.0)
    sent = syncs = 0
    with sender, caplog.at_level(logging.WARNING):
        while sent < 100_000:
            for _ in range(500):
                sender.send_raw(mutate(rng, rng.choice(SEEDS)))
                sent += 1
            # The answer comes after everything sent before it: the server read all of it.
            assert client.get("/sd/seed", timeout=10.0)
            syncs += 1
    assert server.stats.received == sent + syncs
    assert server.stats.overflowed == 0
    assert_all_valid(store)
    assert not any("not handled" in record.getMessage() for record in caplog.records)


def test_a_get_after_a_burst_of_twenty_thousand_is_answered(
    store: ParamStore, server: OscServer, client: OscClient
) -> None:
    datagrams = [osc_message("/sd/seed", seed) for seed in range(20_000)]
    for datagram in datagrams:
        client.send_raw(datagram)
    client.send("/sd/get", "/sd/seed")
    # A loaded machine may take a while: the bound is generous, the order and counts exact.
    reply = client.receive(10.0)
    assert reply == ("/sd/value", ["/sd/seed", 19_999])
    assert store.version == 20_000
    assert server.stats.received == 20_001
