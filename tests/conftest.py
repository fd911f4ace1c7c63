"""Markers and fixtures shared by the whole suite."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
import torch

from bridge.accel import set_compile_stance
from bridge.control import OscClient, OscServer, ParamStore

# One intra-op thread for torch here and, through the environment, in every bridge process a
# test starts. The test models' tensors are too small to gain from a second thread, while
# OpenMP threads that wait for each other by spinning slow down many times over as soon as
# another process wants the same cores: a bridge under test beside the test itself, two bridges,
# another test run. OMP_NUM_THREADS set before the run wins.
torch.set_num_threads(int(os.environ.setdefault("OMP_NUM_THREADS", "1")))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU; run on a machine with one")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def default_compile_stance() -> Iterator[None]:
    """Every test starts with torch.compile's default stance: an accelerated pipeline leaves the
    process in "eager_on_recompile" (see bridge.accel.accelerate), under which a later test's
    new shapes would run uncompiled."""
    yield
    set_compile_stance("default")


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
