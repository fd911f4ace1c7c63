"""Helpers for talking to a running OSC server in tests."""

from __future__ import annotations

import time
from collections.abc import Callable

from bridge.control import OscClient
from bridge.control.client import ArgValue, Reply


def receive_all(client: OscClient, quiet: float = 0.2) -> list[Reply]:
    """Return every message that arrives until none has for `quiet` seconds."""
    replies = []
    while (reply := client.receive(quiet)) is not None:
        replies.append(reply)
    return replies


def exchange(client: OscClient, address: str, args: list[ArgValue], probe: str) -> list[Reply]:
    """Send one message, then `/sd/get probe`; return every reply up to that value's reply.

    The server handles datagrams in order, so the `/sd/value` for `probe` marks the point where
    everything the first message caused has been sent.
    """
    client.send(address, *args)
    client.send("/sd/get", probe)
    replies = []
    while True:
        reply = client.receive(2.0)
        assert reply is not None, f"the server stopped answering after {address} {args!r}"
        replies.append(reply)
        if reply[0] == "/sd/value" and reply[1][0] == probe:
            return replies


def wait_until(condition: Callable[[], bool], timeout: float = 3.0) -> bool:
    """Poll `condition` until it holds or `timeout` seconds pass; return its last result."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True
