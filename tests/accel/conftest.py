"""Fixtures of the compile tests that run on the CPU."""

from __future__ import annotations

import functools
from collections.abc import Iterator

import pytest
import torch

from bridge.models import Components, load_components


@pytest.fixture
def tiny() -> Iterator[Components]:
    """synthetic:tiny on the CPU, with Dynamo's traces of earlier tests dropped before and this
    test's after, so that what a test counts is its own."""
    torch._dynamo.reset()
    yield load_components("synthetic:tiny", vae="tiny")
    torch._dynamo.reset()


@pytest.fixture
def eager_compile(monkeypatch) -> None:
    """torch.compile with Dynamo's "eager" backend: Dynamo traces for real and runs the traced
    graphs as PyTorch ops, where Inductor's code generation would take minutes on two cores."""
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="eager"))
