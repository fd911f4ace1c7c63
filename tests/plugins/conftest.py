"""Fixtures for the plugin tests: the plugin folders on the path, an OSC server and client.

toe/ and plugins/obs/ are not packages: TouchDesigner imports the component's modules by DAT
name and OBS loads its script from a folder, so the tests import them the same flat way.
"""

from __future__ import annotations

import os
import sys

import pytest

import bridge.io.shm_protocol
from tests.plugins.helpers import OBS_PLUGIN, ROOT, TOE, bridge_run_available

for folder in (TOE, OBS_PLUGIN):
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))

# The component carries bridge/io/shm_protocol.py as its Text DAT `shm_protocol`; outside
# TouchDesigner the same file answers to that name.
sys.modules.setdefault("shm_protocol", bridge.io.shm_protocol)


@pytest.fixture(scope="session")
def bridge_runs() -> None:
    """Skip unless `python -m bridge.cli run` exists in this checkout."""
    if not bridge_run_available():
        pytest.skip("python -m bridge.cli run is not available in this checkout")


@pytest.fixture
def bridge_python(bridge_runs: None, monkeypatch: pytest.MonkeyPatch) -> str:
    """A Python whose child processes import `bridge` from this checkout."""
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH", "")]))
    monkeypatch.setenv("PYTHONPATH", path)
    return sys.executable
