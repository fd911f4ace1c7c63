"""The StreamDiffusionBridge component, built by toe/build_component.py, driven like in a show.

TouchDesigner cannot run here: the builder and the component's glue run against the recorded
stand-in of TouchDesigner's operators in td_standin.py. Everything on the other side is real:
the bridge's OSC server (or a whole `sd-bridge run` child), UDP, and shared memory.
"""

from __future__ import annotations

import importlib
import os
import stat
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import sdb_osc

from bridge.control import OscClient, OscServer, ParamStore
from bridge.control.params import SETTINGS_BY_KEY
from bridge.io.shm_protocol import ShmReader, ShmWriter
from tests.control.helpers import wait_until
from tests.plugins import td_standin
from tests.plugins.helpers import ROOT, TOE, free_udp_port


@pytest.fixture
def td() -> Iterator[td_standin.Root]:
    """A stand-in TouchDesigner with `td` importable; its sockets close afterwards."""
    with td_standin.touchdesigner() as root:
        yield root


@pytest.fixture
def comp(td: td_standin.Root, tmp_path: Path) -> Iterator[td_standin.COMP]:
    """The component, freshly built into /project1 and saved under tmp_path."""
    sys.modules.pop("build_component", None)  # import it against this stand-in `td`
    builder = importlib.import_module("build_component")
    built = builder.build(td.project, tmp_path / "StreamDiffusionBridge.tox")
    built.par.Streamname = f"td{os.getpid() % 100000}"
    built.par.Feedbackport = free_udp_port()
    yield built
    built.Shutdown()


@pytest.fixture
def wired(comp: td_standin.COMP, server: OscServer) -> td_standin.COMP:
    """The component pointed at a running OSC server of the bridge."""
    comp.par.Oscport = server.address[1]
    return comp


def test_the_builder_lays_out_the_operators_and_wiring(
    comp: td_standin.COMP, tmp_path: Path
) -> None:
    network = comp.describe()["children"]
    expected = {
        "in1": ("inTOP", []),
        "spout_out": ("syphonspoutoutTOP", ["in1"]),
        "shm_send": ("scriptTOP", ["in1"]),
        "spout_in": ("syphonspoutinTOP", []),
        "shm_receive": ("scriptTOP", []),
        "output_switch": ("switchTOP", ["spout_in", "shm_receive"]),
        "out1": ("outTOP", ["output_switch"]),
        "oscout": ("oscoutDAT", []),
        "oscin": ("oscinDAT", []),
        "parexec": ("parameterexecuteDAT", []),
        "frame_exec": ("executeDAT", []),
    }
    for name, (op_type, inputs) in expected.items():
        assert network[name] == {"type": op_type, "inputs": inputs}, name
    assert comp.op("oscout").par.address.eval() == "127.0.0.1"
    assert comp.op("parexec").par.op.eval() is comp
    assert comp.saved_to == tmp_path / "StreamDiffusionBridge.tox"
    assert comp.saved_to.exists()


def test_the_component_carries_its_python_as_text_dats(comp: td_standin.COMP) -> None:
    sources = {
        "StreamDiffusionBridgeExt": TOE / "sdb_extension.py",
        "sdb_osc": TOE / "sdb_osc.py",
        "sdb_process": TOE / "sdb_process.py",
        "sdb_supervisor": TOE / "sdb_supervisor.py",
        "sdb_frames": TOE / "sdb_frames.py",
        "shm_protocol": ROOT / "bridge" / "io" / "shm_protocol.py",
    }
    for name, path in sources.items():
        assert comp.op(name).text == path.read_text(encoding="utf-8")
    extension = comp.extensions[0]
    assert type(extension).__name__ == "StreamDiffusionBridgeExt"
    # The extension's imports found the sibling DATs, as TouchDesigner's import does.
    extension_module = comp.op("StreamDiffusionBridgeExt").module
    for name in ("sdb_osc", "sdb_process", "sdb_supervisor", "sdb_frames"):
        assert getattr(extension_module, name) is comp.op(name).module
    assert comp.op("sdb_frames").module.shm_protocol is comp.op("shm_protocol").module


def test_every_live_parameter_is_on_the_bridge_page_with_its_default(
    comp: td_standin.COMP,
) -> None:
    pages = {page.name: page for page in comp.customPages}
    assert list(pages) == ["Bridge", "Launch", "Status", "ControlNet"]
    bridge_pars = [par.name for par in pages["Bridge"].pars]
    live_params = (*sdb_osc.LIVE_PARAMS, *sdb_osc.LORA_PARAMS)
    assert bridge_pars == [live.par for live in live_params] + ["Sendall"]
    for live in live_params:
        par = comp.par[live.par]
        assert par.eval() == live.default
        if live.kind == "float":
            assert par.min == live.minimum and par.clampMin and par.clampMax
            assert par.max <= live.maximum
    assert comp.par.Filterthreshold.max < 1.0
    assert comp.par.Cfg.menuNames == ["none", "full", "self", "initialize"]


def test_the_launch_and_status_pages(comp: td_standin.COMP) -> None:
    launch = [par.name for par in comp.customPages[1].pars]
    assert launch == [
        "Python",
        "Model",
        "Lora0file",
        "Lora1file",
        "Ipadapterfile",
        "Ipadapterimage",
        "Tinyvae",
        "Resolutionw",
        "Resolutionh",
        "Accel",
        "Precision",
        "Compilescope",
        "Livecompile",
        "Backgroundcompile",
        "Transport",
        "Streamname",
        "Streaming",
        "Oscport",
        "Feedbackport",
        "Start",
        "Stop",
    ]
    assert comp.par.Start.isPulse and comp.par.Stop.isPulse
    # The bridge's own choices, so that every menu entry starts a bridge.
    assert comp.par.Precision.menuNames == list(SETTINGS_BY_KEY["precision"].choices)
    assert comp.par.Precision.eval() == "default"
    assert comp.par.Compilescope.menuNames == list(SETTINGS_BY_KEY["compile_scope"].choices)
    assert comp.par.Compilescope.eval() == "model"
    assert comp.par.Livecompile.eval() is True
    assert comp.par.Backgroundcompile.eval() is False
    assert (comp.par.Resolutionw.eval(), comp.par.Resolutionh.eval()) == (512, 512)
    status = comp.customPages[2].pars
    assert [par.name for par in status] == [
        "State",
        "Lasterror",
        "Log",
        "Fps",
        "Latency",
        "Drops",
        "Skips",
    ]
    assert all(par.readOnly for par in status)
    assert comp.par.State.eval() == "stopped"


def test_changed_parameters_reach_the_bridge(wired: td_standin.COMP, store: ParamStore) -> None:
    wired.par.Prompt = "a lighthouse in fog"
    wired.par.Delta = 0.4
    wired.par.Tindex = "20, 35, 45"
    wired.par.Filterenable = True
    wired.par.Cfg = "initialize"
    assert wait_until(lambda: store.get("cfg_type") == "initialize")
    assert store.get("prompt") == "a lighthouse in fog"
    assert store.get("delta") == pytest.approx(0.4)
    assert store.get("t_index_list") == (20, 35, 45)
    assert store.get("similarity_filter") is True
    assert wired.op("oscout").sent[0] == [("/sd/prompt", ["a lighthouse in fog"])]


def test_a_malformed_t_index_is_shown_and_not_sent(wired: td_standin.COMP) -> None:
    wired.par.Tindex = "45, 20"
    assert wired.op("oscout").sent == []
    assert "strictly increasing" in wired.par.Lasterror.eval()


def test_a_value_the_bridge_refuses_shows_its_error_sentence(
    td: td_standin.Root, wired: td_standin.COMP, store: ParamStore
) -> None:
    wired.par.Tindex = "60, 70"  # well formed, but past num_inference_steps (50)
    assert td.run_frames_until(lambda: wired.par.Lasterror.eval() != "")
    assert wired.par.Lasterror.eval().startswith("/sd/t_index got [60, 70]; send 1 to 8")
    assert store.get("t_index_list") == (32, 45)


def test_send_all_subscribes_and_status_fills_the_status_page(
    td: td_standin.Root, wired: td_standin.COMP, server: OscServer, store: ParamStore
) -> None:
    wired.par.Promptfade = 3.0  # set before, then sent again with everything else
    wired.par.Sendall.pulse()
    feedback = ("127.0.0.1", int(wired.par.Feedbackport.eval()))
    assert wait_until(lambda: feedback in server.subscribers)
    assert store.get("prompt_fade") == 3.0

    def status_arrived() -> bool:
        server.publish_status(29.5, 12.25, 3, 4)
        return wired.par.Skips.eval() == 4

    assert td.run_frames_until(status_arrived)
    assert wired.par.Fps.eval() == 29.5
    assert wired.par.Latency.eval() == 12.25
    assert wired.par.Drops.eval() == 3


def test_shutdown_unsubscribes_and_a_subscription_is_renewed(
    td: td_standin.Root,
    wired: td_standin.COMP,
    server: OscServer,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    wired.par.Sendall.pulse()
    feedback = ("127.0.0.1", int(wired.par.Feedbackport.eval()))
    assert wait_until(lambda: feedback in server.subscribers)
    extension = sys.modules["StreamDiffusionBridgeExt"]
    monkeypatch.setattr(extension, "RESUBSCRIBE_EVERY", 0.0)
    sent_before = len(wired.op("oscout").sent)
    td.run_frame()
    assert wired.op("oscout").sent[sent_before:] == [[("/sd/subscribe", [feedback[1]])]]
    wired.Shutdown()
    assert wait_until(lambda: server.subscribers == ())


def test_shared_memory_frames_flow_through_the_script_tops(
    td: td_standin.Root, comp: td_standin.COMP
) -> None:
    comp.par.Transport = "shm"
    name = comp.par.Streamname.eval()
    assert comp.op("output_switch").par.index.eval() == 1
    assert comp.op("spout_out").par.active.eval() is False
    image = np.zeros((4, 2, 4), np.float32)
    image[0] = (1.0, 0.0, 0.0, 1.0)  # TouchDesigner's row 0 is the bottom row
    image[1:] = (0.0, 0.0, 1.0, 1.0)
    comp.op("in1").image = image
    reader = ShmReader(f"{name}-in")
    try:
        got: list = []
        assert td.run_frames_until(lambda: got.append(reader.read()) or got[-1] is not None)
        pixels, meta = got[-1]
        assert (meta.width, meta.height, meta.pixel_format) == (2, 4, "rgba")
        assert pixels[3, 0].tolist() == [255, 0, 0, 255]  # red is at the bottom of the frame
        assert pixels[0, 0].tolist() == [0, 0, 255, 255]
    finally:
        reader.close()

    output = np.zeros((2, 3, 3), np.uint8)
    output[0] = (0, 255, 0)  # the top row of the bridge's rgb frame is green
    with ShmWriter(f"{name}-out", 3, 2, "rgb") as writer:
        writer.write(output)
        receive = comp.op("shm_receive")
        assert td.run_frames_until(lambda: receive.image is not None)
    assert receive.image.dtype == np.uint8 and receive.image.shape == (2, 3, 4)
    assert receive.image[1, 0].tolist() == [0, 255, 0, 255]  # shown bottom row first
    assert receive.image[0, 0].tolist() == [0, 0, 0, 255]


def test_spout_transport_names_the_senders_and_leaves_shared_memory_alone(
    td: td_standin.Root, comp: td_standin.COMP
) -> None:
    comp.par.Transport = "spout"
    comp.par.Streamname = "stage"
    assert comp.op("spout_out").par.sendername.eval() == "stage-in"
    assert comp.op("spout_out").par.active.eval() is True
    assert comp.op("spout_in").par.sendername.eval() == "stage-out"
    assert comp.op("output_switch").par.index.eval() == 0
    comp.op("in1").image = np.zeros((2, 2, 4), np.float32)
    td.run_frame()
    td.run_frame()
    assert comp.op("shm_send").cooks == 0 and comp.op("shm_receive").cooks == 0


def test_a_bad_stream_name_is_shown_and_keeps_the_old_wiring(comp: td_standin.COMP) -> None:
    comp.par.Transport = "spout"
    comp.par.Streamname = "stage"
    comp.par.Streamname = "no spaces please"
    assert "Stream name 'no spaces please'" in comp.par.Lasterror.eval()
    assert comp.op("spout_out").par.sendername.eval() == "stage-in"


def test_start_with_a_missing_python_shows_why(comp: td_standin.COMP) -> None:
    comp.par.Python = "/no/such/python"
    comp.par.Start.pulse()
    assert "'/no/such/python' was not found" in comp.par.Lasterror.eval()
    assert comp.par.State.eval() == "stopped"


def sleeping_python(folder: Path) -> str:
    """An executable that stands in for Python: it sleeps, except that `-c` runs Python.

    The supervisor runs its watchdog with `-c`; the bridge it then starts only sleeps.
    """
    script = folder / "python-standin"
    script.write_text(
        f'#!/bin/sh\n[ "$1" = -c ] && exec {sys.executable} "$@"\n'
        f"exec {sys.executable} -c 'import time; time.sleep(60)'\n"
    )
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    return str(script)


@pytest.mark.skipif(sys.platform == "win32", reason="the stand-in Python is a shell script")
def test_quitting_touchdesigner_stops_the_bridge(
    td: td_standin.Root, comp: td_standin.COMP, tmp_path: Path
) -> None:
    comp.par.Python = sleeping_python(tmp_path)
    comp.par.Start.pulse()
    assert comp.par.State.eval().startswith("running (pid ")
    pid = int(comp.par.State.eval().split("pid ")[1].rstrip(")"))
    td.exit()
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    td.run_frame()
    assert comp.par.State.eval() == "stopped"


@pytest.mark.slow
def test_the_component_runs_the_real_bridge_over_shared_memory(
    td: td_standin.Root, comp: td_standin.COMP, bridge_python: str
) -> None:
    comp.par.Python = bridge_python
    comp.par.Model = "synthetic:tiny"
    comp.par.Resolutionw = comp.par.Resolutionh = 64
    comp.par.Accel = "none"
    comp.par.Transport = "shm"
    comp.par.Oscport = free_udp_port()
    comp.par.Promptfade = 2.5  # no command-line flag: sent once the bridge reports status
    comp.op("in1").image = np.random.default_rng(0).random((64, 64, 4), dtype=np.float32)
    comp.par.Start.pulse()
    assert comp.par.State.eval().startswith("running"), comp.par.Lasterror.eval()

    receive = comp.op("shm_receive")
    arrived = td.run_frames_until(
        lambda: comp.par.Fps.eval() > 0 and receive.image is not None, frames=6000
    )
    assert arrived, f"{comp.par.State.eval()}; {comp.par.Lasterror.eval()}"
    assert receive.image.shape == (64, 64, 4) and receive.image.dtype == np.uint8

    comp.par.Prompt = "a glass city at night"
    with OscClient("127.0.0.1", int(comp.par.Oscport.eval()), timeout=2.0) as client:
        assert client.get("/sd/prompt/fade") == [2.5]
        assert wait_until(lambda: client.get("/sd/prompt") == ["a glass city at night"])

    comp.par.Stop.pulse()
    assert td.run_frames_until(lambda: comp.par.State.eval() == "stopped", frames=3000)
    assert comp.par.Fps.eval() == 0


@pytest.mark.parametrize(
    "name", ["sdb_osc", "sdb_process", "sdb_supervisor", "sdb_frames", "sdb_extension"]
)
def test_the_modules_load_where_dat_modules_stay_out_of_sys_modules(name: str) -> None:
    # Whether TouchDesigner registers a DAT module in sys.modules before running it is not
    # documented; dataclasses with postponed annotations need it, so these modules avoid them.
    namespace = {"__name__": f"unregistered_{name}"}
    source = (TOE / f"{name}.py").read_text(encoding="utf-8")
    exec(compile(source, name, "exec", dont_inherit=True), namespace)
    assert namespace["__doc__"]
