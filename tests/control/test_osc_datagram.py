"""The bounded OSC reader: every rule of bridge/control/osc_datagram.py, one datagram at a time."""

from __future__ import annotations

import struct

import pytest
from pythonosc.osc_message_builder import OscMessageBuilder

from bridge.control.osc_datagram import (
    MAX_ARRAY_DEPTH,
    MAX_BUNDLE_DEPTH,
    Incoming,
    OscDatagramError,
    read_datagram,
)


def message(address: str, *args: object) -> bytes:
    builder = OscMessageBuilder(address=address)
    for arg in args:
        builder.add_arg(arg)
    return builder.build().dgram


def bundle(*contents: bytes, time_tag: int = 1) -> bytes:
    body = b"".join(struct.pack(">i", len(content)) + content for content in contents)
    return b"#bundle\x00" + struct.pack(">Q", time_tag) + body


def nested(depth: int) -> bytes:
    datagram = message("/sd/seed", 9)
    for _ in range(depth):
        datagram = bundle(datagram)
    return datagram


def test_every_tag_read_comes_back_as_its_python_value() -> None:
    datagram = message("/x", 7, 0.5, "forest", b"\x01\x02\x03", True, False, None, [1, [2]])
    assert read_datagram(datagram) == [
        Incoming("/x", (7, 0.5, "forest", b"\x01\x02\x03", True, False, None, [1, [2]]))
    ]
    wide = b"/x\x00\x00,dhS\x00\x00\x00\x00" + struct.pack(">dq", 0.25, 2**40) + b"ab\x00\x00"
    assert read_datagram(wide) == [Incoming("/x", (0.25, 2**40, "ab"))]


@pytest.mark.parametrize(
    ("datagram", "problem"),
    [
        (b"/sd/delta\x00\x00\x00,f\x00\x00", "ends 0 bytes into a 'f' argument"),
        (b"/sd/delta\x00\x00\x00,f\x00\x00\x3f\x00", "ends 2 bytes into a 'f' argument"),
        (b"/sd/delta\x00\x00\x00,cf\x00" + struct.pack(">if", 65, 0.5), "type tag 'c'"),
        (message("/sd/delta", 0.5) + b"\x00\x00\x00\x00", "4 bytes are left over"),
        (b"/sd/delta\x00\x00\x00", "no type tag string"),
        (b"/sd/delta\x00\x00\x00f\x00\x00\x00\x3f\x00\x00\x00", "does not start with ','"),
        (b"/sd/t_index\x00,[i\x00" + struct.pack(">i", 3), "not closed"),
        (b"/sd/t_index\x00,]\x00\x00", "not opened"),
        (b"/x\x00\x00,b\x00\x00" + struct.pack(">i", -4), "blob size -4"),
        (b"/x\x00\x00,b\x00\x00" + struct.pack(">i", 1) + b"\x01\x07\x00\x00", "blob is padded"),
        (b"/x\x00\x00,s\x00\x00ab\x00\x07", "padded with bytes other than NUL"),
        (b"/x\x00\x00,s\x00\x00\xff\xfe\x00\x00", "not UTF-8"),
        (b"/x\x00\x00,s\x00\x00abcd", "no terminating NUL"),
        (b"/x\x00\x00,[[[[[i]]]]]\x00" + struct.pack(">i", 1), f"{MAX_ARRAY_DEPTH} deep"),
    ],
)
def test_tags_and_data_that_do_not_match_exactly_are_a_problem_of_the_message(
    datagram: bytes, problem: str
) -> None:
    (read,) = read_datagram(datagram)
    assert read.args == ()
    assert problem in read.problem


@pytest.mark.parametrize(
    ("datagram", "reason"),
    [
        (b"", "no terminating NUL"),
        (b"sd/seed\x00,i\x00\x00" + struct.pack(">i", 1), "does not start with an address"),
        (b"/sd/se", "no terminating NUL"),
        (b"/sd/x\x00\x01\x00,i\x00\x00", "padded with bytes other than NUL"),
        (b"\xff/\x00\x00,i\x00\x00", "not UTF-8"),
        (b"#bundle\x00\x00\x00", "inside its time tag"),
        (bundle(b"/x\x00\x00,\x00\x00\x00")[:-1], "not a positive multiple of 4"),
        (b"#bundle\x00" + bytes(8) + struct.pack(">i", -4) + bytes(20), "size -4"),
        (b"#bundle\x00" + bytes(8) + struct.pack(">i", 0), "size 0"),
        (b"#bundle\x00" + bytes(8) + struct.pack(">i", 6) + b"/x\x00\x00,\x00", "size 6"),
        (b"#bundle\x00" + bytes(8) + struct.pack(">i", 64) + b"/x\x00\x00,\x00\x00\x00", "64"),
        (bundle(message("/x")) + b"\x00\x00", "ends inside an element size"),
        (bundle(message("/x"), b"x\x00\x00\x00,\x00\x00\x00"), "does not start with an address"),
        (nested(MAX_BUNDLE_DEPTH + 1), f"nested more than {MAX_BUNDLE_DEPTH} deep"),
        (nested(400), f"nested more than {MAX_BUNDLE_DEPTH} deep"),
        (bytes(65536), "more than a UDP datagram holds"),
    ],
)
def test_broken_framing_makes_the_whole_datagram_unreadable(datagram: bytes, reason: str) -> None:
    with pytest.raises(OscDatagramError, match=reason):
        read_datagram(datagram)


def test_bundles_nest_up_to_the_limit() -> None:
    assert read_datagram(nested(MAX_BUNDLE_DEPTH)) == [Incoming("/sd/seed", (9,))]
    assert read_datagram(bundle()) == []


def test_messages_come_out_in_datagram_order_whatever_their_time_tags() -> None:
    later = bundle(message("/sd/seed", 1), time_tag=2**40)
    sooner = bundle(message("/sd/seed", 2), message("/sd/delta", 0.5), time_tag=2)
    read = read_datagram(bundle(later, sooner, message("/sd/seed", 3)))
    assert [(m.address, m.args) for m in read] == [
        ("/sd/seed", (1,)),
        ("/sd/seed", (2,)),
        ("/sd/delta", (0.5,)),
        ("/sd/seed", (3,)),
    ]


def test_a_bad_message_in_a_bundle_leaves_its_neighbours_readable() -> None:
    broken = b"/sd/delta\x00\x00\x00,f\x00\x00"
    read = read_datagram(bundle(message("/sd/seed", 4), broken))
    assert read[0] == Incoming("/sd/seed", (4,))
    assert read[1].address == "/sd/delta" and read[1].problem
