"""Fixtures for the control layer: a store, a running OSC server on a free port, a client."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from bridge.control import OscClient


@pytest.fixture
def listener() -> Iterator[OscClient]:
    """A socket on 127.0.0.1 that feedback can be sent to; read it with `receive`."""
    with OscClient("127.0.0.1", 9, local_host="127.0.0.1", timeout=2.0) as listening:
        yield listening
