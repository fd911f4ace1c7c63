"""What the OBS script needs besides OBS: OSC over UDP, the bridge's command line, its process.

Standard library only: OBS runs scripts in its own Python, where nothing else is installed.
OBS puts the script's folder on the import path, so `sd_bridge_obs.py` imports this file as
`sd_bridge_core`, and this file imports the process supervisor `sdb_supervisor` beside it.
"""

from __future__ import annotations

import socket
import struct
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from sdb_supervisor import ProcessState

OscArg = int | float | str | bool
Message = tuple[str, list[OscArg]]

TEXT_SETTLE = 0.6
"""Seconds a text field must rest before it is sent: OBS reports every keystroke."""
RESUBSCRIBE_EVERY = 5.0
"""Seconds between two `/sd/subscribe`: subscriptions expire, and a restarted bridge has
forgotten its subscribers."""

# OSC 1.0: big-endian numbers; strings NUL-terminated and padded to a multiple of 4 bytes.
_INT = struct.Struct(">i")
_FLOAT = struct.Struct(">f")
_BUNDLE_IMMEDIATELY = b"#bundle\0" + struct.pack(">Q", 1)


def _osc_string(text: str) -> bytes:
    raw = text.encode("utf-8") + b"\0"
    return raw + b"\0" * (-len(raw) % 4)


def encode_message(address: str, args: Sequence[OscArg]) -> bytes:
    """One OSC message: bool as T/F, int as i, float as f, str as s."""
    tags = ","
    payload = b""
    for arg in args:
        if isinstance(arg, bool):
            tags += "T" if arg else "F"
        elif isinstance(arg, int):
            tags += "i"
            payload += _INT.pack(arg)
        elif isinstance(arg, float):
            tags += "f"
            payload += _FLOAT.pack(arg)
        elif isinstance(arg, str):
            tags += "s"
            payload += _osc_string(arg)
        else:
            raise TypeError(f"OSC argument {arg!r} is not a bool, int, float or str.")
    return _osc_string(address) + _osc_string(tags) + payload


def encode_bundle(messages: Sequence[Message]) -> bytes:
    """An OSC bundle to apply at once; the bridge stores its changes as one."""
    content = b""
    for address, args in messages:
        message = encode_message(address, args)
        content += _INT.pack(len(message)) + message
    return _BUNDLE_IMMEDIATELY + content


def decode_message(data: bytes) -> Message | None:
    """Read one OSC message (types i f d h s T F N); None for bundles and anything unreadable."""
    try:
        address, offset = _read_string(data, 0)
        tags, offset = _read_string(data, offset)
        if not address.startswith("/") or not tags.startswith(","):
            return None
        args: list[OscArg] = []
        for tag in tags[1:]:
            if tag in "if":
                (value,) = (_INT if tag == "i" else _FLOAT).unpack_from(data, offset)
                offset += 4
            elif tag in "dh":
                (value,) = struct.unpack_from(">d" if tag == "d" else ">q", data, offset)
                offset += 8
            elif tag == "s":
                value, offset = _read_string(data, offset)
            elif tag in "TFN":
                value = {"T": True, "F": False, "N": None}[tag]
            else:
                return None
            args.append(value)
    except (struct.error, UnicodeDecodeError, ValueError):
        return None
    return address, args


def _read_string(data: bytes, offset: int) -> tuple[str, int]:
    end = data.index(b"\0", offset)
    text = data[offset:end].decode("utf-8")
    return text, end + 1 + (-(end + 1 - offset) % 4)


class OscLink:
    """One UDP socket: sends to the bridge and receives its replies and status on the same port."""

    def __init__(self, host: str = "127.0.0.1", port: int = 7000) -> None:
        self.target = (host, port)
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self._sock.bind(("127.0.0.1", 0))
        self._sock.setblocking(False)

    @property
    def local_port(self) -> int:
        """The port replies and status arrive on."""
        return self._sock.getsockname()[1]

    def send(self, messages: Sequence[Message]) -> None:
        """Send one message as it is, several as one bundle; nobody listening is no error."""
        if not messages:
            return
        datagram = encode_message(*messages[0]) if len(messages) == 1 else encode_bundle(messages)
        try:
            self._sock.sendto(datagram, self.target)
        except OSError:
            pass  # no bridge yet; the values go over again once it reports status

    def receive(self) -> list[Message]:
        """Every readable message that arrived since the last call."""
        received = []
        while True:
            try:
                data = self._sock.recv(65535)
            except (BlockingIOError, InterruptedError):
                return received
            except OSError:
                continue  # a "port unreachable" left by an earlier send to no bridge
            message = decode_message(data)
            if message is not None:
                received.append(message)

    def close(self) -> None:
        """Close the socket."""
        self._sock.close()


@dataclass(frozen=True)
class LiveSetting:
    """A script property that changes the running bridge: its settings key and OSC address."""

    key: str
    label: str
    address: str
    kind: str  # "text", "float", "int" or "bool"
    default: str | float | int
    minimum: float = 0.0
    maximum: float = 0.0
    step: float = 1.0


LIVE_SETTINGS: tuple[LiveSetting, ...] = (
    LiveSetting("prompt", "Prompt", "/sd/prompt", "text", "a psychedelic painting, vivid colours"),
    LiveSetting("negative_prompt", "Negative prompt", "/sd/negative_prompt", "text", ""),
    LiveSetting("prompt_fade", "Prompt fade (s)", "/sd/prompt/fade", "float", 0.0, 0.0, 60.0, 0.1),
    LiveSetting("delta", "Delta", "/sd/delta", "float", 1.0, 0.0, 5.0, 0.01),
    LiveSetting("guidance", "Guidance", "/sd/guidance", "float", 1.2, 0.0, 20.0, 0.05),
    LiveSetting("seed", "Seed", "/sd/seed", "int", 2, 0, 2**31 - 1, 1),
    LiveSetting("seed_fade", "Seed fade (s)", "/sd/seed/fade", "float", 0.0, 0.0, 60.0, 0.1),
    LiveSetting(
        "ip_adapter_scale", "IP-Adapter scale", "/sd/ipadapter/scale", "float", 0.6, 0.0, 2.0, 0.01
    ),
)

LORA_SLOTS = 2
"""LoRA files the script can start the bridge with (Bridge group: lora_0_file, lora_1_file)."""
LORA_SETTINGS: tuple[LiveSetting, ...] = tuple(
    LiveSetting(
        f"lora_{slot}_scale",
        f"LoRA {slot} scale",
        f"/sd/lora/{slot}/scale",
        "float",
        1.0,
        -2.0,
        2.0,
        0.01,
    )
    for slot in range(LORA_SLOTS)
)
"""The live scale of each LoRA slot, also its start scale; sent only for slots with a file."""


def lora_files(paths: Sequence[str]) -> list[str]:
    """The LoRA files of the slots in use, which must be filled from the first on."""
    given = [path.strip() for path in paths]
    used = [path for path in given if path]
    if given[: len(used)] != used:
        raise ValueError("A LoRA slot has a file after an empty one; fill the LoRA slots in order.")
    return used


CONTROLNET_SLOTS = 2
"""ControlNets the script can start the bridge with (ControlNet group: controlnet_0_model and
controlnet_0_source, the same for slot 1)."""
CONTROLNET_SETTINGS: tuple[LiveSetting, ...] = tuple(
    setting
    for slot in range(CONTROLNET_SLOTS)
    for setting in (
        LiveSetting(
            f"controlnet_{slot}_scale",
            f"ControlNet {slot} scale",
            f"/sd/controlnet/{slot}/scale",
            "float",
            1.0,
            0.0,
            2.0,
            0.01,
        ),
        LiveSetting(
            f"controlnet_{slot}_enable",
            f"ControlNet {slot} on",
            f"/sd/controlnet/{slot}/enable",
            "bool",
            True,
        ),
        LiveSetting(
            f"controlnet_{slot}_canny_low",
            f"ControlNet {slot} canny low",
            f"/sd/controlnet/{slot}/canny/low",
            "float",
            100.0,
            0.0,
            2040.0,
            1.0,
        ),
        LiveSetting(
            f"controlnet_{slot}_canny_high",
            f"ControlNet {slot} canny high",
            f"/sd/controlnet/{slot}/canny/high",
            "float",
            200.0,
            0.0,
            2040.0,
            1.0,
        ),
    )
)
"""The live values of each ControlNet slot; its scale is also its start scale. Sent only for
slots with a model."""


def controlnet_entries(
    controlnets: Sequence[tuple[str, str]], values: Mapping[str, object]
) -> list[str]:
    """The bridge's `controlnet` entries, MODEL@SOURCE@SCALE, of the (model, source) slots in use.

    Slots are filled from the first; an empty source is canny, the edges of the input.
    """
    given = [(model.strip(), source.strip()) for model, source in controlnets]
    used = [(model, source) for model, source in given if model]
    if given[: len(used)] != used:
        raise ValueError(
            "A ControlNet slot has a model after an empty one; fill the ControlNet slots in order."
        )
    entries = []
    for slot, (model, source) in enumerate(used):
        if "@" in model or "@" in source:
            raise ValueError(
                f"ControlNet {slot}'s model or source has an @, which the bridge reads as a "
                "separator; rename the folder or file."
            )
        scale = float(values.get(f"controlnet_{slot}_scale", 1.0))
        entries.append(f"{model}@{source or 'canny'}@{scale}")
    return entries


@dataclass
class BridgeStatus:
    """What the bridge last reported."""

    fps: float = 0.0
    latency_ms: float = 0.0
    drops: int = 0
    skips: int = 0
    last_error: str = ""
    reports: int = 0


class Controller:
    """Keeps the bridge in step with the script's properties and collects what it reports.

    Numbers go out as soon as they change; text waits until it has rested TEXT_SETTLE seconds,
    so typing a prompt sends it once. `tick` (from an OBS timer) sends what rested, reads the
    bridge's messages and renews the status subscription.
    """

    def __init__(self, link: OscLink, clock: Callable[[], float] = time.monotonic) -> None:
        self.link = link
        self.status = BridgeStatus()
        self._clock = clock
        self._values: dict[str, OscArg] = {}
        self._sent: dict[str, OscArg] = {}
        self._typed_at: dict[str, float] = {}
        self._subscribed_at = -RESUBSCRIBE_EVERY
        self._resend_on_report = False
        # How many LoRA files the bridge was started with: their scales are sent, no others.
        self.loras = 0
        # Likewise for ControlNets: the values of the slots it was started with.
        self.controlnets = 0

    def _live_settings(self) -> tuple[LiveSetting, ...]:
        loaded = tuple(f"controlnet_{slot}_" for slot in range(self.controlnets))
        controlnets = tuple(s for s in CONTROLNET_SETTINGS if s.key.startswith(loaded))
        return LIVE_SETTINGS + LORA_SETTINGS[: self.loras] + controlnets

    def update(self, values: Mapping[str, object]) -> None:
        """Take the current property values; send the numbers that changed."""
        now = self._clock()
        numbers: list[Message] = []
        for setting in self._live_settings():
            if setting.key not in values:
                continue
            value = _typed(setting, values[setting.key])
            if value == self._values.get(setting.key):
                continue
            self._values[setting.key] = value
            if setting.kind == "text":
                self._typed_at[setting.key] = now
            elif value != self._sent.get(setting.key):
                numbers.append((setting.address, [value]))
                self._sent[setting.key] = value
        self.link.send(numbers)

    def send_all(self) -> None:
        """Send every value in one bundle, as when a bridge has just started."""
        messages = []
        for setting in self._live_settings():
            if setting.key in self._values:
                messages.append((setting.address, [self._values[setting.key]]))
                self._sent[setting.key] = self._values[setting.key]
                self._typed_at.pop(setting.key, None)
        self.link.send(messages)

    def resend_on_next_report(self) -> None:
        """Send everything once the bridge reports status (it listens from then on)."""
        self._resend_on_report = True

    def tick(self) -> None:
        """Send rested text, read replies and status, and renew the subscription when due."""
        now = self._clock()
        rested = [key for key, at in self._typed_at.items() if now - at >= TEXT_SETTLE]
        messages = []
        for setting in self._live_settings():
            if setting.key in rested:
                del self._typed_at[setting.key]
                if self._values[setting.key] != self._sent.get(setting.key):
                    messages.append((setting.address, [self._values[setting.key]]))
                    self._sent[setting.key] = self._values[setting.key]
        self.link.send(messages)
        if now - self._subscribed_at >= RESUBSCRIBE_EVERY:
            self.link.send([("/sd/subscribe", [self.link.local_port])])
            self._subscribed_at = now
        for address, args in self.link.receive():
            self._take(address, args)

    def close(self) -> None:
        """Unsubscribe from the bridge's status and close the link (the script unloads)."""
        self.link.send([("/sd/unsubscribe", [self.link.local_port])])
        self.link.close()

    def _take(self, address: str, args: list[OscArg]) -> None:
        fields = {
            "/sd/status/fps": "fps",
            "/sd/status/latency_ms": "latency_ms",
            "/sd/status/drops": "drops",
            "/sd/status/skips": "skips",
        }
        if address in fields and len(args) == 1 and isinstance(args[0], (int, float)):
            kind = int if fields[address] in ("drops", "skips") else float
            setattr(self.status, fields[address], kind(args[0]))
            self.status.reports += 1
            if self._resend_on_report:
                self._resend_on_report = False
                self.send_all()
        elif address == "/sd/error" and len(args) == 2:
            self.status.last_error = str(args[1])


def _typed(setting: LiveSetting, value: object) -> OscArg:
    if setting.kind == "text":
        return str(value)
    if setting.kind == "bool":
        return bool(value)
    if setting.kind == "int":
        return int(value)
    return float(value)


INPUTS: dict[str, str] = {
    "obs_vcam": "OBS Virtual Camera (OBS's program)",
    "camera": "Camera",
    "spout": "Spout sender",
    "pattern": "Test pattern",
    "ndi": "NDI source (e.g. DistroAV's output)",
}
OUTPUTS: dict[str, str] = {"vcam": "Virtual camera", "spout": "Spout sender", "ndi": "NDI sender"}


@dataclass(frozen=True)
class Launch:
    """How to start the bridge: the choices of the script's Bridge properties."""

    python: str
    model: str
    input_kind: str
    camera: str
    input_sender: str
    output_kind: str
    output_device: str
    output_sender: str
    width: int
    height: int
    osc_port: int
    values: Mapping[str, object] = field(default_factory=dict)
    loras: Sequence[str] = ()
    ip_adapter: str = ""
    """IP-Adapter weights file; empty: none."""
    ip_adapter_image: str = ""
    """The picture it follows: a file, or a source URI such as `ndi:OBS`."""
    controlnets: Sequence[tuple[str, str]] = ()
    """(model, control source) of each ControlNet slot; its scale is in `values`."""


def bridge_command(launch: Launch, platform: str = sys.platform) -> list[str]:
    """The `sd-bridge run` command line for `launch`, or ValueError saying what to change."""
    values = {s.key: _typed(s, launch.values.get(s.key, s.default)) for s in LIVE_SETTINGS}
    command = [
        launch.python,
        "-m",
        "bridge.cli",
        "run",
        f"--input={_input_uri(launch, platform)}",
        f"--output={_output_uri(launch, platform)}",
        f"--model={launch.model}",
        f"--width={launch.width}",
        f"--height={launch.height}",
        "--osc-host=127.0.0.1",
        f"--osc-port={launch.osc_port}",
        f"--prompt={values['prompt']}",
        f"--negative-prompt={values['negative_prompt']}",
        f"--guidance={values['guidance']}",
        f"--delta={values['delta']}",
        f"--seed={values['seed']}",
    ] + [
        f"--lora={path}:{_typed(setting, launch.values.get(setting.key, setting.default))}"
        for path, setting in zip(lora_files(launch.loras), LORA_SETTINGS, strict=False)
    ]
    command += [
        f"--controlnet={entry}" for entry in controlnet_entries(launch.controlnets, launch.values)
    ]
    return command + _ip_adapter_flags(launch, values["ip_adapter_scale"])


def _ip_adapter_flags(launch: Launch, scale: OscArg) -> list[str]:
    if not launch.ip_adapter.strip():
        return []
    if not launch.ip_adapter_image.strip():
        raise ValueError(
            "The IP-Adapter needs a picture to follow; give an IP-Adapter picture: an image "
            "file, or a source such as ndi:OBS."
        )
    return [
        f"--ip-adapter={launch.ip_adapter.strip()}",
        f"--ip-adapter-image={launch.ip_adapter_image.strip()}",
        f"--ip-adapter-scale={scale}",
    ]


def _input_uri(launch: Launch, platform: str) -> str:
    if launch.input_kind == "pattern":
        return "pattern:bars"
    if launch.input_kind == "spout":
        _require_windows(platform, "input")
        return f"spout:{launch.input_sender}"
    if launch.input_kind == "ndi":
        return f"ndi:{_sender_name(launch.input_sender, 'input')}"
    if launch.input_kind not in ("camera", "obs_vcam"):
        raise ValueError(
            f"Input {launch.input_kind!r} is unknown; pick one of {', '.join(INPUTS)}."
        )
    if not launch.camera.strip():
        raise ValueError(
            "Camera is empty; type the camera's index (0, 1, ...) or, on Linux, its device "
            "like /dev/video10."
        )
    return f"cam:{launch.camera.strip()}"


def _output_uri(launch: Launch, platform: str) -> str:
    if launch.output_kind == "spout":
        _require_windows(platform, "output")
        return f"spout:{launch.output_sender}"
    if launch.output_kind == "ndi":
        return f"ndi:{_sender_name(launch.output_sender, 'output')}"
    if launch.output_kind != "vcam":
        raise ValueError(
            f"Output {launch.output_kind!r} is unknown; pick one of {', '.join(OUTPUTS)}."
        )
    device = launch.output_device.strip()
    if launch.input_kind == "obs_vcam":
        if not platform.startswith("linux"):
            raise ValueError(
                "OBS Virtual Camera serves one program at a time and OBS is feeding it the "
                "bridge's input; send the result out through Spout, or read a real camera."
            )
        if not device or device == launch.camera.strip():
            raise ValueError(
                "The bridge needs a v4l2loopback device of its own for its output; set Output "
                "device to one OBS's virtual camera does not use, like /dev/video11."
            )
    return f"vcam:{device}" if device else "vcam"


def _sender_name(name: str, role: str) -> str:
    if not name.strip():
        raise ValueError(f"The {role} sender name is empty; type the NDI name, e.g. OBS.")
    return name.strip()


def _require_windows(platform: str, role: str) -> None:
    if platform != "win32":
        raise ValueError(
            f"Spout exists on Windows only; pick another {role} on this system "
            "(a camera or the test pattern in, the virtual camera out)."
        )


def status_line(state: ProcessState, status: BridgeStatus) -> str:
    """One line for the script's Status field."""
    parts = [f"Bridge {state.text}"]
    if state.running and status.reports:
        parts.append(f"{status.fps:.1f} fps, {status.latency_ms:.0f} ms")
    if status.last_error:
        parts.append(f"last error: {status.last_error}")
    return "; ".join(parts)
