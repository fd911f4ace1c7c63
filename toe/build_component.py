"""Build the StreamDiffusionBridge component inside TouchDesigner and save it as a .tox.

Run it once from TouchDesigner's Textport (toe/README.md walks through it)::

    import runpy
    runpy.run_path(r"C:/path/to/streamdiffusion-bridge/toe/build_component.py", run_name="__main__")

It creates `/project1/StreamDiffusionBridge` (replacing one built before), fills it with the
operators, custom parameters and Python below, and saves `toe/StreamDiffusionBridge.tox` next to
this file. The component carries its Python as Text DATs, so the .tox works without this folder.
"""

from __future__ import annotations

import sys
from pathlib import Path

import td

COMP_NAME = "StreamDiffusionBridge"
EXTENSION_DAT = "StreamDiffusionBridgeExt"

HERE = Path(__file__).resolve().parent
TOX_PATH = HERE / f"{COMP_NAME}.tox"

# Text DAT name -> source file. TouchDesigner's `import` finds a DAT by name in the component.
MODULES: dict[str, Path] = {
    EXTENSION_DAT: HERE / "sdb_extension.py",
    "sdb_osc": HERE / "sdb_osc.py",
    "sdb_process": HERE / "sdb_process.py",
    "sdb_supervisor": HERE / "sdb_supervisor.py",
    "sdb_frames": HERE / "sdb_frames.py",
    "shm_protocol": HERE.parent / "bridge" / "io" / "shm_protocol.py",
}

PAREXEC_CALLBACKS = '''\
"""Every change or pulse of a custom parameter goes to the extension."""


def onValueChange(par, prev):
    parent().OnValueChange(par)


def onPulse(par):
    parent().OnPulse(par)
'''

FRAME_CALLBACKS = '''\
"""Each frame the extension follows the bridge process and moves shared-memory frames."""


def onFrameStart(frame):
    parent().OnFrameStart()


def onExit():
    parent().Shutdown()
'''

OSC_CALLBACKS = '''\
"""Status from the OSC In DAT and replies to the OSC Out DAT go to the extension."""


def onReceiveOSC(dat, rowIndex, message, bytes, timeStamp, address, args, peer):
    parent().OnOscReceived(address, args)
'''

SEND_CALLBACKS = '''\
"""The shm_send Script TOP publishes its input for the bridge's shm: source."""


def onCook(scriptOp):
    parent().SendFrame(scriptOp)
'''

RECEIVE_CALLBACKS = '''\
"""The shm_receive Script TOP shows what the bridge's shm: sink wrote."""


def onCook(scriptOp):
    parent().ReceiveFrame(scriptOp)
'''


def build(parent=None, tox_path: Path = TOX_PATH):
    """Create the component in `parent` (default /project1), save it to `tox_path`, return it."""
    parent = parent if parent is not None else td.op("/project1")
    old = parent.op(COMP_NAME)
    if old is not None:
        old.destroy()
    comp = parent.create(td.baseCOMP, COMP_NAME)
    _add_modules(comp)
    _add_network(comp)
    _add_parameters(comp)
    _add_controlnet_page(comp)
    comp.par.ext0object = f"op('./{EXTENSION_DAT}').module.{EXTENSION_DAT}(me)"
    comp.par.ext0promote = True
    comp.initializeExtensions()
    # Callbacks last: while the build sets values, no extension is there to receive them.
    _add_executes(comp)
    comp.save(str(tox_path))
    return comp


def _add_modules(comp) -> None:
    for column, (name, path) in enumerate(MODULES.items()):
        dat = _place(comp.create(td.textDAT, name), column, 4)
        dat.text = path.read_text(encoding="utf-8")


def _add_network(comp) -> None:
    """The frame path (Spout, or Script TOPs on shared memory) and the OSC pair."""
    source = _place(comp.create(td.inTOP, "in1"), 0, 0)
    spout_out = _place(comp.create(td.syphonspoutoutTOP, "spout_out"), 1, 0)
    spout_out.inputConnectors[0].connect(source)
    shm_send = _place(comp.create(td.scriptTOP, "shm_send"), 1, 1)
    shm_send.inputConnectors[0].connect(source)
    shm_send.par.callbacks = _callbacks(comp, "shm_send_callbacks", SEND_CALLBACKS, 1, 2).name

    spout_in = _place(comp.create(td.syphonspoutinTOP, "spout_in"), 3, 0)
    shm_receive = _place(comp.create(td.scriptTOP, "shm_receive"), 3, 1)
    shm_receive.par.callbacks = _callbacks(
        comp, "shm_receive_callbacks", RECEIVE_CALLBACKS, 3, 2
    ).name
    switch = _place(comp.create(td.switchTOP, "output_switch"), 4, 0)
    switch.inputConnectors[0].connect(spout_in)
    switch.inputConnectors[1].connect(shm_receive)
    _place(comp.create(td.outTOP, "out1"), 5, 0).inputConnectors[0].connect(switch)

    osc_callbacks = _callbacks(comp, "osc_callbacks", OSC_CALLBACKS, 6, 2)
    oscout = _place(comp.create(td.oscoutDAT, "oscout"), 6, 0)
    oscout.par.address = "127.0.0.1"
    oscout.par.callbacks = osc_callbacks.name
    oscin = _place(comp.create(td.oscinDAT, "oscin"), 6, 1)
    oscin.par.callbacks = osc_callbacks.name


def _add_executes(comp) -> None:
    """The DATs that call the extension on parameter changes and every frame."""
    parexec = _place(comp.create(td.parameterexecuteDAT, "parexec"), 7, 0)
    parexec.text = PAREXEC_CALLBACKS
    parexec.par.op.expr = "parent()"  # the component, wherever the .tox is loaded
    parexec.par.pars = "*"
    parexec.par.custom = True
    parexec.par.builtin = False
    parexec.par.valuechange = True
    parexec.par.onpulse = True
    frame_exec = _place(comp.create(td.executeDAT, "frame_exec"), 7, 1)
    frame_exec.text = FRAME_CALLBACKS
    frame_exec.par.framestart = True
    frame_exec.par.exit = True


# The models offered in the Model parameter's menu: SD-Turbo, SDXL-Turbo, SDXS, SD 1.5, SDXL.
MODEL_CHOICES = (
    "stabilityai/sd-turbo",
    "stabilityai/sdxl-turbo",
    "IDKiro/sdxs-512-0.9",
    "stable-diffusion-v1-5/stable-diffusion-v1-5",
    "stabilityai/stable-diffusion-xl-base-1.0",
)


def _add_parameters(comp) -> None:
    """The Bridge, Launch and Status pages; live parameters come from `sdb_osc.LIVE_PARAMS` and
    `sdb_osc.LORA_PARAMS`."""
    page = comp.appendCustomPage("Bridge")
    sdb_osc = comp.op("sdb_osc").module
    for live in (*sdb_osc.LIVE_PARAMS, *sdb_osc.LORA_PARAMS):
        _append_live(page, live)
    page.appendPulse("Sendall", label="Send all values")

    page = comp.appendCustomPage("Launch")
    python = page.appendFile("Python", label="Python executable")[0]
    python.default = python.val = "python" if sys.platform == "win32" else "python3"
    model = _string(page, "Model", "Model", "stabilityai/sd-turbo")
    # Suggestions in the parameter's menu; any other folder, file or Hugging Face id may be typed.
    model.menuNames = list(MODEL_CHOICES)
    model.menuLabels = list(MODEL_CHOICES)
    for slot in range(sdb_osc.LORA_SLOTS):
        # Its scale is the Bridge page's LoRA scale, live.
        page.appendFile(f"Lora{slot}file", label=f"LoRA {slot} file")
    # Its scale is the Bridge page's IP-Adapter scale, live; the picture a file or a source URI.
    page.appendFile("Ipadapterfile", label="IP-Adapter file")
    _string(page, "Ipadapterimage", "IP-Adapter picture (file or URI)", "")
    _toggle(page, "Tinyvae", "Tiny VAE (TAESD)", True)
    width, height = page.appendWH("Resolution", label="Resolution")
    for par in (width, height):
        par.default = par.val = 512
        par.min = par.normMin = 64
        par.normMax = 1024
        par.clampMin = True
    _menu(page, "Accel", "Acceleration", ("auto", "none", "cudagraph", "compile"), "auto")
    _menu(page, "Precision", "UNet precision", ("default", "fp8"), "default")
    _menu(page, "Compilescope", "Compile scope", ("model", "blocks"), "model")
    _toggle(page, "Livecompile", "Compile live changes", True)
    _toggle(page, "Backgroundcompile", "Compile in the background", False)
    _menu(page, "Transport", "Transport", ("auto", "spout", "shm", "ndi"), "auto")
    _string(page, "Streamname", "Stream name", "sdbridge")
    _toggle(page, "Streaming", "Send and receive frames", True)
    _int(page, "Oscport", "Bridge OSC port", 7000, 1, 65535)
    _int(page, "Feedbackport", "Status port", 7001, 1, 65535)
    page.appendPulse("Start", label="Start bridge")
    page.appendPulse("Stop", label="Stop bridge")

    page = comp.appendCustomPage("Status")
    for name, label in (("State", "Bridge"), ("Lasterror", "Last error"), ("Log", "Log file")):
        _string(page, name, label, "stopped" if name == "State" else "").readOnly = True
    for name, label in (("Fps", "FPS"), ("Latency", "Latency (ms)")):
        par = page.appendFloat(name, label=label)[0]
        par.readOnly = True
    for name, label in (("Drops", "Dropped frames"), ("Skips", "Skipped frames")):
        par = page.appendInt(name, label=label)[0]
        par.readOnly = True


def _add_controlnet_page(comp) -> None:
    """The ControlNet page: per slot, the model and control source it starts with (Start reads
    them) and its live values from `sdb_osc.CONTROLNET_PARAMS`."""
    page = comp.appendCustomPage("ControlNet")
    sdb_osc = comp.op("sdb_osc").module
    for slot in range(sdb_osc.CONTROLNET_SLOTS):
        _string(page, f"Controlnet{slot}model", f"ControlNet {slot} model", "")
        # canny, passthrough, or a source URI such as spout:KinectDepth.
        _string(page, f"Controlnet{slot}source", f"ControlNet {slot} control", "canny")
        for live in sdb_osc.CONTROLNET_PARAMS:
            if live.address.startswith(f"/sd/controlnet/{slot}/"):
                _append_live(page, live)


def _append_live(page, live) -> None:
    if live.kind in ("str", "int_list"):
        _string(page, live.par, live.label, live.default)
    elif live.kind == "toggle":
        _toggle(page, live.par, live.label, live.default)
    elif live.kind == "menu":
        _menu(page, live.par, live.label, live.choices, live.default)
    elif live.kind == "int":
        _int(page, live.par, live.label, live.default, live.minimum, live.maximum)
    else:
        par = page.appendFloat(live.par, label=live.label)[0]
        par.default = par.val = live.default
        # A range that excludes its top (the filter threshold) stops one step below it.
        top = live.maximum - 0.001 if live.maximum_exclusive else live.maximum
        par.min = par.normMin = live.minimum
        par.max = par.normMax = top
        par.clampMin = par.clampMax = True


def _string(page, name: str, label: str, default: str):
    par = page.appendStr(name, label=label)[0]
    par.default = par.val = default
    return par


def _toggle(page, name: str, label: str, default: bool):
    par = page.appendToggle(name, label=label)[0]
    par.default = par.val = default
    return par


def _int(page, name: str, label: str, default: int, minimum: float, maximum: float):
    par = page.appendInt(name, label=label)[0]
    par.default = par.val = default
    par.min = par.normMin = int(minimum)
    par.max = int(maximum)
    par.normMax = min(int(maximum), 1000)
    par.clampMin = par.clampMax = True
    return par


def _menu(page, name: str, label: str, choices, default: str):
    par = page.appendMenu(name, label=label)[0]
    par.menuNames = list(choices)
    par.menuLabels = list(choices)
    par.default = par.val = default
    return par


def _callbacks(comp, name: str, text: str, column: int, row: int):
    dat = _place(comp.create(td.textDAT, name), column, row)
    dat.text = text
    return dat


def _place(operator, column: int, row: int):
    """Lay the network out on a grid so it reads left to right in the network editor."""
    operator.nodeX = column * 200
    operator.nodeY = -row * 150
    return operator


if __name__ == "__main__":
    built = build()
    print(f"{built.path} saved to {TOX_PATH}")
