"""StreamDiffusion bridge for OBS Studio: start `sd-bridge run` and steer it from Tools > Scripts.

Add this file in OBS's Scripts window (plugins/obs/README.md has the steps); keep
`sd_bridge_core.py` and `sdb_supervisor.py` in the same folder. The prompt, delta, guidance,
seed and fades go to the bridge over OSC as they change; Start and Stop launch the bridge with
the chosen input and output, and can also be bound to hotkeys in OBS's settings.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import obspython as obs
import sd_bridge_core as core
import sdb_supervisor

TICK_MS = 100
HOTKEYS = (
    ("sd_bridge.start", "Start the StreamDiffusion bridge"),
    ("sd_bridge.stop", "Stop the StreamDiffusion bridge"),
)

_settings = None
_controller: core.Controller | None = None
# One log per OBS process: a second OBS never truncates a log the first one's bridge writes.
_process = sdb_supervisor.BridgeProcess(
    Path(tempfile.gettempdir()) / f"sd-bridge-obs{os.getpid()}.log"
)
_hotkeys: dict[str, int] = {}
_last_status = ""


def script_description() -> str:
    """The text OBS shows above the properties."""
    return (
        "<b>StreamDiffusion bridge</b><br>"
        "Runs <code>sd-bridge run</code> on a camera, OBS's own Virtual Camera or Spout, and "
        "steers it live over OSC. Bring the result back with a Spout2 Capture source (Windows) "
        "or a Video Capture Device source on the bridge's virtual camera."
    )


# Models the bridge runs, for the Model field's tooltip; any diffusers folder, single-file
# checkpoint or Hugging Face id of an SD 1.x, SD 2.x or SDXL model works too.
MODEL_CHOICES = (
    "stabilityai/sd-turbo",
    "stabilityai/sdxl-turbo",
    "IDKiro/sdxs-512-0.9",
    "stable-diffusion-v1-5/stable-diffusion-v1-5",
    "stabilityai/stable-diffusion-xl-base-1.0",
)
MODEL_HINT = "For example " + ", ".join(MODEL_CHOICES) + ", or a local folder or .safetensors file."
IP_ADAPTER_IMAGE_HINT = (
    "The picture whose style the output follows: an image file (PNG, JPEG), or a source such as "
    "ndi:OBS or spout:Style whose newest frame is followed."
)


def script_defaults(settings) -> None:
    """Default values of every property."""
    for setting in core.LIVE_SETTINGS + core.LORA_SETTINGS + core.CONTROLNET_SETTINGS:
        if setting.kind == "text":
            obs.obs_data_set_default_string(settings, setting.key, setting.default)
        elif setting.kind == "bool":
            obs.obs_data_set_default_bool(settings, setting.key, setting.default)
        elif setting.kind == "int":
            obs.obs_data_set_default_int(settings, setting.key, setting.default)
        else:
            obs.obs_data_set_default_double(settings, setting.key, setting.default)
    python = "python" if sys.platform == "win32" else "python3"
    obs.obs_data_set_default_string(settings, "python", python)
    obs.obs_data_set_default_string(settings, "model", "stabilityai/sd-turbo")
    for slot in range(core.CONTROLNET_SLOTS):
        obs.obs_data_set_default_string(settings, f"controlnet_{slot}_source", "canny")
    obs.obs_data_set_default_string(settings, "input_kind", "obs_vcam")
    obs.obs_data_set_default_string(settings, "camera", "0")
    obs.obs_data_set_default_string(settings, "input_sender", "OBS")
    default_output = "spout" if sys.platform == "win32" else "vcam"
    obs.obs_data_set_default_string(settings, "output_kind", default_output)
    obs.obs_data_set_default_string(settings, "output_sender", "sd-bridge")
    obs.obs_data_set_default_int(settings, "width", 512)
    obs.obs_data_set_default_int(settings, "height", 512)
    obs.obs_data_set_default_int(settings, "osc_port", 7000)


def script_properties():
    """The property widgets: live settings, the Bridge group, the status line."""
    props = obs.obs_properties_create()
    for setting in core.LIVE_SETTINGS + core.LORA_SETTINGS:
        _add_live(props, setting)

    launch = obs.obs_properties_create()
    obs.obs_properties_add_path(launch, "python", "Python executable", obs.OBS_PATH_FILE, "", None)
    model = obs.obs_properties_add_text(launch, "model", "Model", obs.OBS_TEXT_DEFAULT)
    obs.obs_property_set_long_description(model, MODEL_HINT)
    for slot in range(core.LORA_SLOTS):
        key, label = f"lora_{slot}_file", f"LoRA {slot} file (scale above)"
        obs.obs_properties_add_path(launch, key, label, obs.OBS_PATH_FILE, "*.safetensors", None)
    label = "IP-Adapter file (scale above)"
    filters = "*.safetensors *.bin"
    obs.obs_properties_add_path(launch, "ip_adapter_file", label, obs.OBS_PATH_FILE, filters, None)
    picture = obs.obs_properties_add_text(
        launch, "ip_adapter_image", "IP-Adapter picture", obs.OBS_TEXT_DEFAULT
    )
    obs.obs_property_set_long_description(picture, IP_ADAPTER_IMAGE_HINT)
    _add_list(launch, "input_kind", "Input", core.INPUTS)
    obs.obs_properties_add_text(launch, "camera", "Camera index or device", obs.OBS_TEXT_DEFAULT)
    obs.obs_properties_add_text(
        launch, "input_sender", "Input sender (Spout/NDI)", obs.OBS_TEXT_DEFAULT
    )
    _add_list(launch, "output_kind", "Output", core.OUTPUTS)
    obs.obs_properties_add_text(launch, "output_device", "Output device", obs.OBS_TEXT_DEFAULT)
    obs.obs_properties_add_text(
        launch, "output_sender", "Output sender (Spout/NDI)", obs.OBS_TEXT_DEFAULT
    )
    obs.obs_properties_add_int(launch, "width", "Width", 64, 2048, 8)
    obs.obs_properties_add_int(launch, "height", "Height", 64, 2048, 8)
    obs.obs_properties_add_int(launch, "osc_port", "Bridge OSC port", 1, 65535, 1)
    obs.obs_properties_add_button(launch, "start", "Start bridge", _start_clicked)
    obs.obs_properties_add_button(launch, "stop", "Stop bridge", _stop_clicked)
    obs.obs_properties_add_group(props, "bridge", "Bridge", obs.OBS_GROUP_NORMAL, launch)

    controlnets = obs.obs_properties_create()
    for slot in range(core.CONTROLNET_SLOTS):
        label = f"ControlNet {slot} model (starts with the bridge)"
        obs.obs_properties_add_text(
            controlnets, f"controlnet_{slot}_model", label, obs.OBS_TEXT_DEFAULT
        )
        label = f"ControlNet {slot} control: canny, passthrough or a source URI"
        obs.obs_properties_add_text(
            controlnets, f"controlnet_{slot}_source", label, obs.OBS_TEXT_DEFAULT
        )
        for setting in core.CONTROLNET_SETTINGS:
            if setting.key.startswith(f"controlnet_{slot}_"):
                _add_live(controlnets, setting)
    obs.obs_properties_add_group(
        props, "controlnet", "ControlNet", obs.OBS_GROUP_NORMAL, controlnets
    )

    obs.obs_properties_add_text(props, "status", "Status", obs.OBS_TEXT_INFO)
    obs.obs_properties_add_button(props, "refresh", "Refresh status", _refresh_clicked)
    return props


def script_load(settings) -> None:
    """Open the OSC link, register the hotkeys and start the timer."""
    global _settings, _controller
    _settings = settings
    port = obs.obs_data_get_int(settings, "osc_port")
    _controller = core.Controller(core.OscLink("127.0.0.1", port))
    for name, description in HOTKEYS:
        action = _start if name.endswith("start") else _stop
        hotkey = obs.obs_hotkey_register_frontend(name, description, _on_press(action))
        saved = obs.obs_data_get_array(settings, name)
        obs.obs_hotkey_load(hotkey, saved)
        obs.obs_data_array_release(saved)
        _hotkeys[name] = hotkey
    obs.timer_add(_tick, TICK_MS)


def script_update(settings) -> None:
    """A property changed: send what changed to the bridge."""
    global _settings
    _settings = settings
    if _controller is None:
        return
    port = obs.obs_data_get_int(settings, "osc_port")
    if _controller.link.target[1] != port:
        _controller.link.target = ("127.0.0.1", port)
    _controller.update(_live_values(settings))


def script_save(settings) -> None:
    """Keep the hotkey bindings with the script's settings."""
    for name, hotkey in _hotkeys.items():
        saved = obs.obs_hotkey_save(hotkey)
        obs.obs_data_set_array(settings, name, saved)
        obs.obs_data_array_release(saved)


def script_unload() -> None:
    """OBS unloads the script or quits: stop the bridge and close the link."""
    obs.timer_remove(_tick)
    _process.stop_and_wait()
    if _controller is not None:
        _controller.close()


def _start() -> None:
    if _settings is None or _controller is None:
        return
    launch = core.Launch(
        python=obs.obs_data_get_string(_settings, "python"),
        model=obs.obs_data_get_string(_settings, "model"),
        input_kind=obs.obs_data_get_string(_settings, "input_kind"),
        camera=obs.obs_data_get_string(_settings, "camera"),
        input_sender=obs.obs_data_get_string(_settings, "input_sender"),
        output_kind=obs.obs_data_get_string(_settings, "output_kind"),
        output_device=obs.obs_data_get_string(_settings, "output_device"),
        output_sender=obs.obs_data_get_string(_settings, "output_sender"),
        width=obs.obs_data_get_int(_settings, "width"),
        height=obs.obs_data_get_int(_settings, "height"),
        osc_port=obs.obs_data_get_int(_settings, "osc_port"),
        values=_live_values(_settings),
        loras=[
            obs.obs_data_get_string(_settings, f"lora_{n}_file") for n in range(core.LORA_SLOTS)
        ],
        ip_adapter=obs.obs_data_get_string(_settings, "ip_adapter_file"),
        ip_adapter_image=obs.obs_data_get_string(_settings, "ip_adapter_image"),
        controlnets=[
            (
                obs.obs_data_get_string(_settings, f"controlnet_{n}_model"),
                obs.obs_data_get_string(_settings, f"controlnet_{n}_source"),
            )
            for n in range(core.CONTROLNET_SLOTS)
        ],
    )
    try:
        command = core.bridge_command(launch)
        _controller.loras = len(core.lora_files(launch.loras))
        _controller.controlnets = len(core.controlnet_entries(launch.controlnets, launch.values))
        if launch.input_kind == "obs_vcam" and not obs.obs_frontend_virtualcam_active():
            obs.obs_frontend_start_virtualcam()
        # Keyed by the OSC port, which a bridge left behind by a crash of OBS would still hold.
        _process.pid_path = Path(tempfile.gettempdir()) / f"sd-bridge-osc{launch.osc_port}.pid"
        _process.start(command)
    except (ValueError, RuntimeError) as error:
        _controller.status.last_error = str(error)
    else:
        _controller.status.last_error = ""
        _controller.resend_on_next_report()
    _show_status()


def _stop() -> None:
    _process.stop()
    _show_status()


def _on_press(action):
    def pressed(is_pressed: bool) -> None:
        if is_pressed:
            action()

    return pressed


def _start_clicked(props, prop) -> bool:
    _start()
    return True


def _stop_clicked(props, prop) -> bool:
    _stop()
    return True


def _refresh_clicked(props, prop) -> bool:
    _show_status()
    return True


def _tick() -> None:
    if _controller is not None:
        _controller.tick()
    _show_status()


def _show_status() -> None:
    """Put the status line in the Status field and, when it changes, in OBS's script log."""
    global _last_status
    if _controller is None:
        return
    state = _process.poll()
    if _settings is not None:
        obs.obs_data_set_string(_settings, "status", core.status_line(state, _controller.status))
    # The fps figure changes every second; the log gets the state and errors only.
    errors_only = core.BridgeStatus(last_error=_controller.status.last_error)
    logged = core.status_line(state, errors_only)
    if logged != _last_status:
        _last_status = logged
        print(logged)


def _add_list(props, key: str, label: str, choices: dict[str, str]) -> None:
    prop = obs.obs_properties_add_list(
        props, key, label, obs.OBS_COMBO_TYPE_LIST, obs.OBS_COMBO_FORMAT_STRING
    )
    for value, name in choices.items():
        obs.obs_property_list_add_string(prop, name, value)


def _add_live(props, setting) -> None:
    """The property widget of one live setting."""
    if setting.kind == "text":
        text_type = obs.OBS_TEXT_MULTILINE if setting.key == "prompt" else obs.OBS_TEXT_DEFAULT
        obs.obs_properties_add_text(props, setting.key, setting.label, text_type)
    elif setting.kind == "bool":
        obs.obs_properties_add_bool(props, setting.key, setting.label)
    elif setting.kind == "int":
        obs.obs_properties_add_int(
            props, setting.key, setting.label, setting.minimum, setting.maximum, setting.step
        )
    else:
        obs.obs_properties_add_float_slider(
            props, setting.key, setting.label, setting.minimum, setting.maximum, setting.step
        )


def _live_values(settings) -> dict[str, object]:
    values: dict[str, object] = {}
    for setting in core.LIVE_SETTINGS + core.LORA_SETTINGS + core.CONTROLNET_SETTINGS:
        if setting.kind == "text":
            values[setting.key] = obs.obs_data_get_string(settings, setting.key)
        elif setting.kind == "bool":
            values[setting.key] = obs.obs_data_get_bool(settings, setting.key)
        elif setting.kind == "int":
            values[setting.key] = obs.obs_data_get_int(settings, setting.key)
        else:
            values[setting.key] = obs.obs_data_get_double(settings, setting.key)
    return values
