"""Markers and fixtures shared by the whole suite."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from bridge.control import OscClient, OscServer, ParamStore


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU; run on a machine with one")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def store() -> ParamStore:
    """A parameter store holding the defaults."""
    return ParamStore()


@pytest.fixture
def server(store: ParamStore) -> Iterator[OscServer]:
    """The bridge's OSC server on 127.0.0.1 and a free port, serving `store`."""
    with OscServer(store, port=0) as running:
        yield running


@pytest.fixture
def client(server: OscServer) -> Iterator[OscClient]:
    """A client sending to `server` from 127.0.0.1 and reading its replies."""
    with OscClient(*server.address, local_host="127.0.0.1", timeout=2.0) as connected:
        yield connected
