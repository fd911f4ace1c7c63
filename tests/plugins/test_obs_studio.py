"""The OBS script in a real OBS Studio, headless under Xvfb, driven through obs-websocket.

OBS loads plugins/obs/sd_bridge_obs.py from its scene collection, as it does after a user adds
the script in Tools > Scripts. The bridge's real OSC server receives what the script sends;
hotkeys triggered over obs-websocket press Start and Stop; a second, test-only script lists
the real property widgets that OBS builds from `script_properties`.

Needs the Debian packages obs-studio and xvfb; skipped with the reason when they are missing.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from bridge.control import OscServer, ParamStore
from tests.control.helpers import wait_until
from tests.plugins.helpers import OBS_PLUGIN, free_tcp_port, require_program
from tests.plugins.obs_websocket import ObsWebSocket

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="headless OBS needs Xvfb")

OBS_29 = (29 << 24) | 2  # LastVersion: no "what's new" dialog at start

PROPERTIES_PROBE = '''\
"""Test-only: describe the property widgets OBS builds from the bridge script, into OBS's log."""
import json
import obspython as obs
import sd_bridge_obs

KINDS = {{
    getattr(obs, "OBS_PROPERTY_" + kind): kind.lower()
    for kind in ("TEXT", "FLOAT", "INT", "LIST", "BUTTON", "GROUP", "PATH", "BOOL")
}}


def script_load(settings):
    props = sd_bridge_obs.script_properties()
    for name in {names!r}:
        prop = obs.obs_properties_get(props, name)
        if prop is None:
            continue
        kind = KINDS.get(obs.obs_property_get_type(prop), "other")
        entry = {{"kind": kind, "label": obs.obs_property_description(prop)}}
        if kind == "list":
            entry["items"] = [
                obs.obs_property_list_item_string(prop, index)
                for index in range(obs.obs_property_list_item_count(prop))
            ]
        # One line each: OBS cuts a log line after a few kilobytes.
        print("PROPERTY " + json.dumps([name, entry]))
    print("PROPERTIES DONE")
    obs.obs_properties_destroy(props)
'''

EXPECTED_PROPERTIES = {
    "prompt": "text",
    "negative_prompt": "text",
    "prompt_fade": "float",
    "delta": "float",
    "guidance": "float",
    "seed": "int",
    "seed_fade": "float",
    "ip_adapter_scale": "float",
    "lora_0_scale": "float",
    "lora_1_scale": "float",
    "bridge": "group",
    "python": "path",
    "model": "text",
    "lora_0_file": "path",
    "lora_1_file": "path",
    "ip_adapter_file": "path",
    "ip_adapter_image": "text",
    "input_kind": "list",
    "camera": "text",
    "input_sender": "text",
    "output_kind": "list",
    "output_device": "text",
    "output_sender": "text",
    "width": "int",
    "height": "int",
    "osc_port": "int",
    "start": "button",
    "stop": "button",
    "controlnet": "group",
    **{
        f"controlnet_{slot}_{name}": kind
        for slot in (0, 1)
        for name, kind in (
            ("model", "text"),
            ("source", "text"),
            ("scale", "float"),
            ("enable", "bool"),
            ("canny_low", "float"),
            ("canny_high", "float"),
        )
    },
    "status": "text",
    "refresh": "button",
}

STANDIN_PYTHON = """#!{python}
\"\"\"Stands in for the bridge's Python: records its arguments, stops on Ctrl+C.

Run with -c, as the supervisor runs its watchdog, it is the real Python.\"\"\"
import json, os, signal, sys, time
if sys.argv[1:2] == ["-c"]:
    os.execv(sys.executable, [sys.executable, *sys.argv[1:]])
with open({record!r}, "w") as out:
    json.dump(sys.argv[1:], out)
def stop(*_):
    with open({record!r} + ".stopped", "w") as out:
        out.write("SIGINT")
    sys.exit(0)
signal.signal(signal.SIGINT, stop)
while True:
    time.sleep(0.05)
"""


@dataclass
class RunningObs:
    """A headless OBS: its output so far, its websocket port, the stand-in's record file."""

    output: Path
    websocket_port: int
    record: Path

    def log(self) -> str:
        return self.output.read_text(encoding="utf-8", errors="replace")

    def wait_for_log(self, text: str, *, after: int = 0, timeout: float = 30.0) -> bool:
        """Wait until `text` appears in the output past its first `after` characters."""
        return wait_until(lambda: text in self.log()[after:], timeout=timeout)


@pytest.fixture(scope="module")
def obs_store() -> ParamStore:
    return ParamStore()


@pytest.fixture(scope="module")
def obs_server(obs_store: ParamStore) -> Iterator[OscServer]:
    with OscServer(obs_store, port=0) as running:
        yield running


def write_configuration(home: Path, settings: dict, scripts: list[Path], websocket: int) -> None:
    config = home / ".config" / "obs-studio"
    (config / "basic" / "profiles" / "Bridge").mkdir(parents=True)
    (config / "basic" / "scenes").mkdir(parents=True)
    (config / "global.ini").write_text(
        "[General]\nFirstRun=true\n"
        f"LastVersion={OBS_29}\nEnableAutoUpdates=false\n"
        "[Basic]\nProfile=Bridge\nProfileDir=Bridge\n"
        "SceneCollection=Bridge\nSceneCollectionFile=Bridge\n"
        "[OBSWebSocket]\nFirstLoad=false\nServerEnabled=true\n"
        f"ServerPort={websocket}\nAuthRequired=false\nAlertsEnabled=false\n"
    )
    (config / "basic" / "profiles" / "Bridge" / "basic.ini").write_text(
        "[General]\nName=Bridge\n[Video]\nBaseCX=320\nBaseCY=240\nOutputCX=320\nOutputCY=240\n"
    )
    collection = {
        "name": "Bridge",
        "current_scene": "Scene",
        "current_program_scene": "Scene",
        "scene_order": [{"name": "Scene"}],
        "sources": [{"id": "scene", "versioned_id": "scene", "name": "Scene", "settings": {}}],
        "modules": {
            "scripts-tool": [
                {"path": str(script), "settings": settings if index == 0 else {}}
                for index, script in enumerate(scripts)
            ]
        },
    }
    (config / "basic" / "scenes" / "Bridge.json").write_text(json.dumps(collection))


def start_xvfb() -> tuple[subprocess.Popen, int]:
    read_end, write_end = os.pipe()
    xvfb = subprocess.Popen(
        ["Xvfb", "-displayfd", str(write_end), "-screen", "0", "1280x720x24", "-nolisten", "tcp"],
        pass_fds=(write_end,),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    os.close(write_end)
    with os.fdopen(read_end) as announced:
        display = int(announced.readline())
    return xvfb, display


def stop_group(process: subprocess.Popen, timeout: float) -> None:
    if process.poll() is not None:
        return
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


@pytest.fixture(scope="module")
def running_obs(
    tmp_path_factory: pytest.TempPathFactory, obs_server: OscServer
) -> Iterator[RunningObs]:
    require_program("obs", "obs-studio")
    require_program("Xvfb", "xvfb")
    home = tmp_path_factory.mktemp("obs-home")
    record = home / "bridge-arguments.json"
    standin = home / "python-standin"
    standin.write_text(STANDIN_PYTHON.format(python=sys.executable, record=str(record)))
    standin.chmod(0o755)
    probe = home / "probe_properties.py"
    probe.write_text(PROPERTIES_PROBE.format(names=list(EXPECTED_PROPERTIES)))
    settings = {
        "osc_port": obs_server.address[1],
        "prompt": "a lighthouse in fog",
        "delta": 0.4,
        "seed": 77,
        "prompt_fade": 1.5,
        "python": str(standin),
        "model": "synthetic:tiny",
        "input_kind": "pattern",
        "output_kind": "vcam",
        "output_device": "/dev/video11",
        "width": 64,
        "height": 64,
    }
    websocket = free_tcp_port()
    write_configuration(home, settings, [OBS_PLUGIN / "sd_bridge_obs.py", probe], websocket)
    xvfb, display = start_xvfb()
    output = home / "obs-output.txt"
    environment = dict(
        os.environ,
        HOME=str(home),
        XDG_CONFIG_HOME=str(home / ".config"),
        DISPLAY=f":{display}",
        LIBGL_ALWAYS_SOFTWARE="1",
        PYTHONPATH=str(OBS_PLUGIN),  # lets the probe import the bridge script
    )
    with output.open("wb") as sink:
        obs = subprocess.Popen(
            ["obs", "--multi", "--disable-missing-files-check"],
            env=environment,
            stdout=sink,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        running = RunningObs(output, websocket, record)
        if not running.wait_for_log("WebSocket server is enabled", timeout=60):
            pytest.fail(f"OBS did not start:\n{running.log()[-3000:]}")
        yield running
    finally:
        stop_group(obs, timeout=15)
        xvfb.terminate()
        xvfb.wait(timeout=5)


def test_obs_loads_the_script_and_sends_its_settings_to_the_bridge(
    running_obs: RunningObs, obs_store: ParamStore, obs_server: OscServer
) -> None:
    assert wait_until(lambda: obs_store.get("prompt") == "a lighthouse in fog", timeout=20)
    assert obs_store.get("delta") == pytest.approx(0.4)
    assert obs_store.get("seed") == 77
    assert obs_store.get("prompt_fade") == pytest.approx(1.5)
    # The script subscribes to status from the socket it sends on.
    assert wait_until(lambda: len(obs_server.subscribers) == 1, timeout=10)


def test_obs_builds_every_property_of_the_script(running_obs: RunningObs) -> None:
    assert running_obs.wait_for_log("PROPERTIES DONE")
    properties = dict(
        json.loads(line.split("PROPERTY ", 1)[1])
        for line in running_obs.log().splitlines()
        if "PROPERTY " in line
    )
    kinds = {name: entry["kind"] for name, entry in properties.items()}
    assert kinds == EXPECTED_PROPERTIES
    assert properties["input_kind"]["items"] == ["obs_vcam", "camera", "spout", "pattern", "ndi"]
    assert properties["output_kind"]["items"] == ["vcam", "spout", "ndi"]
    assert properties["start"]["label"] == "Start bridge"


def test_hotkeys_start_the_bridge_with_the_chosen_input_and_output_and_stop_it(
    running_obs: RunningObs, obs_store: ParamStore, obs_server: OscServer
) -> None:
    websocket = ObsWebSocket(running_obs.websocket_port)
    try:
        websocket.request("TriggerHotkeyByName", {"hotkeyName": "sd_bridge.start"})
        assert wait_until(running_obs.record.exists, timeout=15)
        arguments = json.loads(running_obs.record.read_text())
        assert arguments[:3] == ["-m", "bridge.cli", "run"]
        assert "--input=pattern:bars" in arguments
        assert "--output=vcam:/dev/video11" in arguments
        assert "--model=synthetic:tiny" in arguments
        assert "--prompt=a lighthouse in fog" in arguments
        assert running_obs.wait_for_log("Bridge running (pid ")

        # A freshly started bridge knows only the command line; once it reports status, the
        # script sends every value again.
        obs_store.set_many({"prompt_fade": 0.0, "seed": 3})

        def resent() -> bool:
            obs_server.publish_status(30.0, 20.0, 0, 0)
            return obs_store.get("prompt_fade") == pytest.approx(1.5)

        assert wait_until(resent, timeout=10)
        assert obs_store.get("seed") == 77
        before_stop = len(running_obs.log())
        websocket.request("TriggerHotkeyByName", {"hotkeyName": "sd_bridge.stop"})
        stopped = running_obs.record.with_name(running_obs.record.name + ".stopped")
        assert wait_until(stopped.exists, timeout=15)
        assert running_obs.wait_for_log("Bridge stopped", after=before_stop)
    finally:
        websocket.close()
