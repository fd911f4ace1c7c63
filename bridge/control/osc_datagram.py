"""Reading OSC 1.0 datagrams from the network: strictly, with every size checked and bounded.

python-osc's parser is not safe on hostile input (a negative bundle element size makes it loop
forever, short floats are zero-padded, unknown type tags are skipped without reading their data),
so the server reads what arrives with this module and uses python-osc only to build replies.

The rules (docs/osc.md repeats them for senders):

- A datagram is one message or one bundle of at most `MAX_DATAGRAM` bytes.
- A string ends in NUL and is padded with NULs to a multiple of 4 bytes; it must be UTF-8.
- A message is an address starting with `/`, a type tag string starting with `,`, then exactly
  the data its tags call for: every byte read, none missing. The tags read are `i f d h s S b T
  F N` and arrays `[ ]` nested at most `MAX_ARRAY_DEPTH` deep.
- A bundle is `#bundle\\0`, an 8-byte time tag, then elements: each a size (a positive multiple
  of 4, as a big-endian int32) and that many bytes, a message or a bundle. The elements fill the
  bundle exactly, and bundles nest at most `MAX_BUNDLE_DEPTH` deep (the outermost counts).
- Time tags are read and ignored: messages come out in the order they appear in the datagram.

A datagram whose framing breaks a rule (a size, an address, a nesting depth) is unreadable as a
whole and raises `OscDatagramError`, so no part of it applies. A message whose address reads but
whose type tags and data do not match comes back with its `problem`, so it can be refused by
address while the rest of its bundle applies.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

MAX_DATAGRAM = 65535
MAX_BUNDLE_DEPTH = 16
MAX_ARRAY_DEPTH = 4
READ_TAGS = "ifdhsSbTFN[]"

Arg = int | float | str | bytes | bool | None | list
"""One argument as read: `i`/`h` int, `f`/`d` float, `s`/`S` str, `b` bytes, `T`/`F` bool,
`N` None, an array a list."""

_BUNDLE_HEAD = b"#bundle\0"
_FIXED = {
    "i": struct.Struct(">i"),
    "f": struct.Struct(">f"),
    "d": struct.Struct(">d"),
    "h": struct.Struct(">q"),
}
_CONSTANTS = {"T": True, "F": False, "N": None}


class OscDatagramError(ValueError):
    """A datagram that cannot be read at all; the message says which rule it broke."""


@dataclass(frozen=True)
class Incoming:
    """One received message: its address and arguments, or why its arguments cannot be read."""

    address: str
    args: tuple[Arg, ...] = ()
    problem: str = ""


def read_datagram(data: bytes) -> list[Incoming]:
    """Return the messages of one datagram in order, or raise `OscDatagramError`."""
    if len(data) > MAX_DATAGRAM:
        raise OscDatagramError(f"{len(data)} bytes is more than a UDP datagram holds")
    messages: list[Incoming] = []
    if data.startswith(_BUNDLE_HEAD):
        _read_bundle(bytes(data), 1, messages)
    else:
        messages.append(_read_message(bytes(data)))
    return messages


def _read_bundle(data: bytes, depth: int, messages: list[Incoming]) -> None:
    if depth > MAX_BUNDLE_DEPTH:
        raise OscDatagramError(f"bundles are nested more than {MAX_BUNDLE_DEPTH} deep")
    if len(data) < 16:
        raise OscDatagramError("the bundle ends inside its time tag")
    offset = 16
    while offset < len(data):
        if len(data) - offset < 4:
            raise OscDatagramError("the bundle ends inside an element size")
        (size,) = _FIXED["i"].unpack_from(data, offset)
        offset += 4
        if size <= 0 or size % 4 or size > len(data) - offset:
            raise OscDatagramError(
                f"bundle element size {size} is not a positive multiple of 4 within the "
                f"{len(data) - offset} bytes left"
            )
        element = data[offset : offset + size]
        offset += size
        if element.startswith(_BUNDLE_HEAD):
            _read_bundle(element, depth + 1, messages)
        else:
            messages.append(_read_message(element))


def _read_message(data: bytes) -> Incoming:
    address, offset = _read_string(data, 0, "the address")
    if not address.startswith("/"):
        raise OscDatagramError("a message does not start with an address ('/...')")
    try:
        args = _read_arguments(data, offset)
    except OscDatagramError as error:
        return Incoming(address, problem=str(error))
    return Incoming(address, args)


def _read_arguments(data: bytes, offset: int) -> tuple[Arg, ...]:
    if offset == len(data):
        raise OscDatagramError("it has no type tag string")
    tags, offset = _read_string(data, offset, "the type tag string")
    if not tags.startswith(","):
        raise OscDatagramError(f"its type tag string {tags[:20]!r} does not start with ','")
    top: list[Arg] = []
    open_arrays: list[list[Arg]] = [top]
    for tag in tags[1:]:
        if tag not in READ_TAGS:
            raise OscDatagramError(f"type tag {tag!r} is not one this server reads ({READ_TAGS})")
        if tag == "[":
            if len(open_arrays) > MAX_ARRAY_DEPTH:
                raise OscDatagramError(f"its arrays nest more than {MAX_ARRAY_DEPTH} deep")
            inner: list[Arg] = []
            open_arrays[-1].append(inner)
            open_arrays.append(inner)
            continue
        if tag == "]":
            if len(open_arrays) == 1:
                raise OscDatagramError("its type tags close an array that was not opened")
            open_arrays.pop()
            continue
        value, offset = _read_argument(data, offset, tag)
        open_arrays[-1].append(value)
    if len(open_arrays) != 1:
        raise OscDatagramError("its type tags open an array that is not closed")
    if offset != len(data):
        raise OscDatagramError(
            f"{len(data) - offset} bytes are left over after the data its type tags call for"
        )
    return tuple(top)


def _read_argument(data: bytes, offset: int, tag: str) -> tuple[Arg, int]:
    if tag in _CONSTANTS:
        return _CONSTANTS[tag], offset
    if tag in ("s", "S"):
        return _read_string(data, offset, "a string argument")
    fixed = _FIXED["i" if tag == "b" else tag]
    if len(data) - offset < fixed.size:
        raise OscDatagramError(
            f"its data ends {len(data) - offset} bytes into a '{tag}' argument of {fixed.size}"
        )
    (value,) = fixed.unpack_from(data, offset)
    offset += fixed.size
    if tag != "b":
        return value, offset
    padded = value + -value % 4
    if value < 0 or padded > len(data) - offset:
        raise OscDatagramError(f"its blob size {value} does not fit the data")
    if any(data[offset + value : offset + padded]):
        raise OscDatagramError("its blob is padded with bytes other than NUL")
    return data[offset : offset + value], offset + padded


def _read_string(data: bytes, offset: int, what: str) -> tuple[str, int]:
    end = data.find(b"\0", offset)
    if end < 0:
        raise OscDatagramError(f"{what} has no terminating NUL")
    padded = end + 1 + -(end + 1 - offset) % 4
    if padded > len(data):
        raise OscDatagramError(f"{what} is cut short in its padding")
    if any(data[end:padded]):
        raise OscDatagramError(f"{what} is padded with bytes other than NUL")
    try:
        text = data[offset:end].decode("utf-8")
    except UnicodeDecodeError:
        raise OscDatagramError(f"{what} is not UTF-8") from None
    return text, padded
