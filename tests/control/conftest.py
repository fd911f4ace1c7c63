"""Fixtures for the control layer: a store, a running OSC server on a free port, a client."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from bridge.control import OscClient, OscServer, ParamStore


@pytest.fixture
def store() -> ParamStore:
    """A store holding the defaults."""
    return ParamStore()


@pytest.fixture
def server(store: ParamStore) -> Iterator[OscServer]:
    """An OSC server on 127.0.0.1 and a free port, serving `store`."""
    with OscServer(store, port=0) as running:
        yield running


@pytest.fixture
def client(server: OscServer) -> Iterator[OscClient]:
    """A client sending to `server` from 127.0.0.1 and reading its replies."""
    with OscClient(*server.address, local_host="127.0.0.1") as connected:
        yield connected


@pytest.fixture
def listener() -> Iterator[OscClient]:
    """A socket on 127.0.0.1 that feedback can be sent to; read it with `receive`."""
    with OscClient("127.0.0.1", 9, local_host="127.0.0.1", timeout=2.0) as listening:
        yield listening
