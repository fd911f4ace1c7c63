"""Fuzzing the OSC server: any arguments to any address, and datagrams that are not OSC at all.

Each argument test checks the server against an independent statement of the rules in
docs/osc.md: a message the rules allow is stored exactly, any other is answered with an error
and changes nothing, and whatever happens the stored values stay valid.
"""

from __future__ import annotations

import math
import struct

from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from pythonosc.osc_message_builder import OscMessageBuilder

from bridge.control import OscClient, OscServer, ParamStore
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
    sentence = (
        f"unknown OSC address {address}; send /sd/list to get every address this server takes."
    )
    assert replies[0] == ("/sd/error", [address, sentence])
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
    for datagram in (VALID[:13], b"/sd/prompt\x00\x00,s\x00\x00\xff\xfe\xfd\x00", nested(3000)):
        client.send_raw(datagram)
    client.send("/sd/get", "/sd/seed")
    assert receive_all(client) == [("/sd/value", ["/sd/seed", 2])]
    assert server.stats.malformed == 3
