"""A small OSC client for talking to the bridge: send messages, read the replies."""

from __future__ import annotations

import socket
import time
from collections.abc import Sequence
from types import TracebackType

from pythonosc.osc_bundle_builder import IMMEDIATELY, OscBundleBuilder
from pythonosc.osc_message import OscMessage
from pythonosc.osc_message_builder import OscMessageBuilder

from bridge.control.osc_datagram import MAX_DATAGRAM, OscDatagramError, read_datagram
from bridge.control.osc_server import DEFAULT_HOST, DEFAULT_PORT
from bridge.control.params import find_param

ArgValue = str | bytes | bool | int | float | list | None
"""An argument python-osc can encode: `s`, `b`, `T`/`F`, `i` (or `h`), `f`, an array, `N`."""

Reply = tuple[str, list[object]]
"""A received message: its address and its arguments."""


class OscClient:
    """Sends OSC messages to a bridge and receives its replies on the same UDP socket.

    `local_host` picks the address to send from (default: any); replies from the server come
    back to this socket, so `receive` and `get` read them.
    """

    def __init__(
        self,
        host: str = DEFAULT_HOST,
        port: int = DEFAULT_PORT,
        *,
        local_host: str = "",
        timeout: float = 1.0,
    ) -> None:
        family, _, _, _, target = socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM)[0]
        self._target = target
        self._timeout = timeout
        self._sock = socket.socket(family, socket.SOCK_DGRAM)
        self._sock.bind((local_host, 0))

    @property
    def local_address(self) -> tuple[str, int]:
        """The host and port this client sends from and receives on."""
        host, port = self._sock.getsockname()[:2]
        return host, port

    def send(self, address: str, *args: ArgValue) -> None:
        """Send one message; the type of each argument is inferred (`int` is `i`, etc.)."""
        self.send_raw(_message(address, args).dgram)

    def send_bundle(self, messages: Sequence[tuple[str, Sequence[ArgValue]]]) -> None:
        """Send several messages in one bundle, which the bridge applies as one change."""
        builder = OscBundleBuilder(IMMEDIATELY)
        for address, args in messages:
            builder.add_content(_message(address, args))
        self.send_raw(builder.build().dgram)

    def send_raw(self, datagram: bytes) -> None:
        """Send bytes as they are, well-formed or not."""
        self._sock.sendto(datagram, self._target)

    def receive(self, timeout: float | None = None) -> Reply | None:
        """Return the next readable message, or None if none comes within `timeout` seconds."""
        deadline = time.monotonic() + (self._timeout if timeout is None else timeout)
        while True:
            # A timeout of 0 still reads what has already arrived, without waiting.
            self._sock.settimeout(max(0.0, deadline - time.monotonic()))
            try:
                data = self._sock.recv(MAX_DATAGRAM)
            except (TimeoutError, BlockingIOError):
                return None
            try:
                messages = read_datagram(data)
            except OscDatagramError:
                messages = []
            if messages and not messages[0].problem:
                return messages[0].address, list(messages[0].args)
            if time.monotonic() >= deadline:
                return None

    def get(self, name: str, timeout: float | None = None) -> list[object]:
        """Ask for a parameter by address or name (`/sd/guidance`, `guidance`); return its value.

        Other messages received meanwhile are skipped; `/sd/error` about the request raises
        `RuntimeError` with the server's sentence, and no answer raises `TimeoutError`.
        """
        self.send("/sd/get", name)
        deadline = time.monotonic() + (self._timeout if timeout is None else timeout)
        while (left := deadline - time.monotonic()) > 0:
            reply = self.receive(left)
            if reply is None:
                break
            address, args = reply
            if address == "/sd/value" and args and _same_param(name, args[0]):
                return args[1:]
            if address == "/sd/error" and args and args[0] == "/sd/get":
                raise RuntimeError(str(args[1]))
        raise TimeoutError(f"no /sd/value for {name} arrived; check the bridge's host and port.")

    def close(self) -> None:
        """Close the socket."""
        self._sock.close()

    def __enter__(self) -> OscClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()


def _message(address: str, args: Sequence[ArgValue]) -> OscMessage:
    builder = OscMessageBuilder(address=address)
    for arg in args:
        builder.add_arg(arg)
    return builder.build()


def _same_param(name: str, address: object) -> bool:
    asked = find_param(name)
    return name == address or (asked is not None and asked.address == address)
