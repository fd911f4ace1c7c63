"""The OBS script's standard-library half (plugins/obs/sd_bridge_core.py).

Its OSC encoder is checked against python-osc's decoder and its decoder against python-osc's
builder; what it sends goes to the bridge's real OSC server; its command line is read by the
bridge's own parser; its process handling runs real children.
"""

from __future__ import annotations

import struct
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import sd_bridge_core as core
import sdb_supervisor
from hypothesis import given
from hypothesis import strategies as st
from pythonosc.osc_bundle_builder import IMMEDIATELY, OscBundleBuilder
from pythonosc.osc_message import OscMessage
from pythonosc.osc_message_builder import OscMessageBuilder
from pythonosc.osc_packet import OscPacket

from bridge.control import OscServer, ParamStore
from tests.control.helpers import wait_until
from tests.plugins.helpers import parsed_run_settings

text = st.text(st.characters(blacklist_characters="\x00", blacklist_categories=("Cs",)))
osc_args = st.lists(
    st.one_of(
        st.booleans(),
        st.integers(-(2**31), 2**31 - 1),
        st.floats(width=32, allow_nan=False),
        text,
    ),
    max_size=8,
)


@given(address=text.map(lambda tail: "/" + tail), args=osc_args)
def test_python_osc_decodes_every_message_the_encoder_writes(address: str, args: list) -> None:
    message = OscMessage(core.encode_message(address, args))
    assert message.address == address
    assert message.params == args


@pytest.mark.parametrize("length", range(9))
def test_strings_of_every_length_are_padded_to_four_bytes(length: int) -> None:
    datagram = core.encode_message("/sd/prompt", ["x" * length])
    assert len(datagram) % 4 == 0
    assert OscMessage(datagram).params == ["x" * length]


def test_python_osc_reads_a_bundle_as_its_messages_in_order() -> None:
    bundle = core.encode_bundle([("/sd/delta", [0.5]), ("/sd/prompt", ["a forest"])])
    packet = OscPacket(bundle)
    assert [(m.message.address, m.message.params) for m in packet.messages] == [
        ("/sd/delta", [0.5]),
        ("/sd/prompt", ["a forest"]),
    ]


def test_the_encoder_refuses_what_osc_cannot_carry() -> None:
    with pytest.raises(TypeError, match="not a bool, int, float or str"):
        core.encode_message("/sd/seed", [None])


def built(address: str, *typed_args: tuple[str, object]) -> bytes:
    builder = OscMessageBuilder(address=address)
    for tag, value in typed_args:
        builder.add_arg(value, tag)
    return builder.build().dgram


def test_the_decoder_reads_what_python_osc_builds() -> None:
    datagram = built(
        "/sd/value",
        ("s", "/sd/delta"),
        ("f", 0.5),
        ("i", -3),
        ("d", 2.25),
        ("h", 2**40),
        ("T", True),
        ("F", False),
    )
    assert core.decode_message(datagram) == (
        "/sd/value",
        ["/sd/delta", 0.5, -3, 2.25, 2**40, True, False],
    )


@pytest.mark.parametrize(
    "datagram",
    [
        b"",
        b"/sd/status/fps\0\0,f\0\0",  # the float is missing
        b"no slash\0\0\0\0,i\0\0" + struct.pack(">i", 1),
        built("/sd/x", ("b", b"blob")),
        OscBundleBuilder(IMMEDIATELY).build().dgram,
        bytes(range(256)),
    ],
)
def test_the_decoder_gives_none_for_what_it_cannot_read(datagram: bytes) -> None:
    assert core.decode_message(datagram) is None


class FakeClock:
    """A clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def controller(server: OscServer, clock: FakeClock):
    link = core.OscLink(*server.address)
    yield core.Controller(link, clock=clock)
    link.close()


def values(**changes: object) -> dict[str, object]:
    defaults = {setting.key: setting.default for setting in core.LIVE_SETTINGS}
    return {**defaults, **changes}


def test_numbers_are_sent_at_once_and_text_once_it_rests(
    controller: core.Controller, clock: FakeClock, store: ParamStore
) -> None:
    controller.update(values(delta=0.25, prompt="a f"))
    controller.update(values(delta=0.25, prompt="a forest"))
    assert wait_until(lambda: store.get("delta") == 0.25)
    controller.tick()
    assert store.get("prompt") == "a psychedelic painting, vivid colours"  # still typing
    clock.now += core.TEXT_SETTLE + 0.01
    controller.tick()
    assert wait_until(lambda: store.get("prompt") == "a forest")


def test_only_changed_values_are_sent(
    controller: core.Controller, clock: FakeClock, server: OscServer
) -> None:
    controller.update(values())
    clock.now += core.TEXT_SETTLE + 0.01
    controller.tick()
    assert wait_until(lambda: server.stats.received >= 3)
    received = server.stats.received
    controller.update(values())
    clock.now += core.TEXT_SETTLE + 0.01
    controller.tick()
    time.sleep(0.2)
    assert server.stats.received == received


def test_the_controller_subscribes_and_reads_status_and_errors(
    controller: core.Controller, clock: FakeClock, server: OscServer
) -> None:
    controller.tick()
    target = ("127.0.0.1", controller.link.local_port)
    assert wait_until(lambda: target in server.subscribers)
    server.publish_status(24.5, 40.0, 2, 5)
    controller.link.send([("/sd/delta", [9.0])])

    def both_arrived() -> bool:
        controller.tick()
        return controller.status.reports >= 4 and controller.status.last_error != ""

    assert wait_until(both_arrived)
    assert (controller.status.fps, controller.status.latency_ms) == (24.5, 40.0)
    assert (controller.status.drops, controller.status.skips) == (2, 5)
    assert controller.status.last_error == "/sd/delta got 9.0; send a float from 0.0 to 5.0."


def test_closing_the_controller_unsubscribes(
    controller: core.Controller, server: OscServer
) -> None:
    controller.tick()
    assert wait_until(lambda: len(server.subscribers) == 1)
    controller.close()
    assert wait_until(lambda: server.subscribers == ())


def test_after_a_start_everything_is_sent_again_once_the_bridge_reports(
    controller: core.Controller, server: OscServer, store: ParamStore
) -> None:
    controller.update(values(prompt_fade=2.0, prompt="a forest"))
    controller.send_all()
    assert wait_until(lambda: store.get("prompt") == "a forest")
    store.set_many({"prompt": "a restarted bridge's default", "prompt_fade": 0.0})
    controller.resend_on_next_report()
    controller.tick()  # subscribes
    assert wait_until(lambda: len(server.subscribers) == 1)
    server.publish_status(30.0, 10.0, 0, 0)
    assert wait_until(lambda: controller.tick() or store.get("prompt") == "a forest")
    assert store.get("prompt_fade") == 2.0


def test_sending_with_no_bridge_listening_is_no_error(server: OscServer) -> None:
    host, port = server.address
    server.stop()
    link = core.OscLink(host, port)
    try:
        link.send([("/sd/delta", [0.5])])
        time.sleep(0.05)
        assert link.receive() == []  # the "port unreachable" that came back is swallowed
        link.send([("/sd/delta", [0.5])])
    finally:
        link.close()


LAUNCH = core.Launch(
    python=sys.executable,
    model="synthetic:tiny",
    input_kind="obs_vcam",
    camera="1",
    input_sender="OBS",
    output_kind="spout",
    output_device="",
    output_sender="sd-bridge",
    width=64,
    height=96,
    osc_port=7300,
    values={"prompt": "-a forest", "negative_prompt": "blurry", "delta": 0.7, "seed": 9},
)


def test_the_command_line_is_read_by_the_bridge_as_chosen() -> None:
    run = parsed_run_settings(core.bridge_command(LAUNCH, "win32"))
    assert (run.input, run.output) == ("cam:1", ["spout:sd-bridge"])
    assert (run.model, run.width, run.height) == ("synthetic:tiny", 64, 96)
    assert (run.osc_host, run.osc_port) == ("127.0.0.1", 7300)
    assert (run.prompt, run.negative_prompt) == ("-a forest", "blurry")
    assert (run.delta, run.seed, run.guidance_scale) == (0.7, 9, 1.2)
    ParamStore(run.store_values())


def test_an_ip_adapter_file_starts_the_bridge_with_it_its_picture_and_its_scale() -> None:
    launch = replace(
        LAUNCH,
        ip_adapter="C:/models/ip-adapter_sd15.safetensors",
        ip_adapter_image="ndi:OBS",
        values={**LAUNCH.values, "ip_adapter_scale": 0.8},
    )
    run = parsed_run_settings(core.bridge_command(launch, "win32"))
    assert (run.ip_adapter, run.ip_adapter_image, run.ip_adapter_scale) == (
        "C:/models/ip-adapter_sd15.safetensors",
        "ndi:OBS",
        0.8,
    )
    assert not any("--ip-adapter" in part for part in core.bridge_command(LAUNCH, "win32"))
    with pytest.raises(ValueError, match="needs a picture to follow"):
        core.bridge_command(replace(launch, ip_adapter_image=" "), "win32")


@pytest.mark.parametrize(
    ("changes", "platform", "uris"),
    [
        ({"input_kind": "pattern", "output_kind": "vcam"}, "darwin", ("pattern:bars", ["vcam"])),
        ({"input_kind": "camera", "camera": "/dev/video0", "output_kind": "vcam"}, "linux",
         ("cam:/dev/video0", ["vcam"])),
        ({"camera": "/dev/video10", "output_kind": "vcam", "output_device": "/dev/video11"},
         "linux", ("cam:/dev/video10", ["vcam:/dev/video11"])),
        ({"input_kind": "spout", "input_sender": "Resolume"}, "win32",
         ("spout:Resolume", ["spout:sd-bridge"])),
        ({"input_kind": "ndi", "input_sender": "OBS", "output_kind": "ndi"}, "linux",
         ("ndi:OBS", ["ndi:sd-bridge"])),
    ],
)  # fmt: skip
def test_inputs_and_outputs_become_uris(changes: dict, platform: str, uris: tuple) -> None:
    run = parsed_run_settings(core.bridge_command(replace(LAUNCH, **changes), platform))
    assert (run.input, run.output) == uris


@pytest.mark.parametrize(
    ("changes", "platform", "named"),
    [
        ({"output_kind": "vcam"}, "win32", "OBS Virtual Camera serves one program at a time"),
        ({"output_kind": "vcam"}, "darwin", "send the result out through Spout"),
        ({"output_kind": "vcam", "camera": "/dev/video10"}, "linux", "like /dev/video11"),
        ({"output_kind": "vcam", "camera": "/dev/video10", "output_device": "/dev/video10"},
         "linux", "a v4l2loopback device of its own"),
        ({"output_kind": "vcam", "input_kind": "pattern"}, "win32", None),
        ({"input_kind": "spout"}, "linux", "Spout exists on Windows only"),
        ({"input_kind": "camera", "camera": " "}, "win32", "Camera is empty"),
        ({"input_kind": "rtsp"}, "win32", "pick one of obs_vcam, camera, spout, pattern, ndi"),
        ({"input_kind": "ndi", "input_sender": " "}, "linux", "type the NDI name, e.g. OBS"),
    ],
)  # fmt: skip
def test_choices_that_cannot_work_are_refused_with_the_fix(
    changes: dict, platform: str, named: str | None
) -> None:
    launch = replace(LAUNCH, **changes)
    if named is None:
        assert core.bridge_command(launch, platform)
        return
    with pytest.raises(ValueError, match=named) as refused:
        core.bridge_command(launch, platform)
    assert str(refused.value).endswith(".")


def wait_for(process: sdb_supervisor.BridgeProcess, running: bool, timeout: float = 30.0):
    deadline = time.monotonic() + timeout
    while (state := process.poll()).running != running:
        assert time.monotonic() < deadline, f"the child did not reach running={running}"
        time.sleep(0.02)
    return state


@pytest.mark.slow
def test_a_bridge_that_cannot_open_its_output_shows_the_bridge_sentence(
    bridge_python: str, tmp_path: Path
) -> None:
    launch = replace(LAUNCH, python=bridge_python, input_kind="pattern", output_kind="vcam")
    process = sdb_supervisor.BridgeProcess(tmp_path / "bridge.log")
    process.start(core.bridge_command(launch, "linux"))
    state = wait_for(process, running=False, timeout=60)
    assert state.text.startswith("exited with code ")
    assert "virtual camera" in state.text and state.text.endswith(".")
    assert "\n" not in state.text
    line = core.status_line(state, core.BridgeStatus(last_error="x"))
    assert line == f"Bridge {state.text}; last error: x"


def test_the_status_line_shows_rates_only_while_running() -> None:
    status = core.BridgeStatus(fps=29.96, latency_ms=41.4, reports=4)
    running = sdb_supervisor.ProcessState(True, "running (pid 7)")
    assert core.status_line(running, status) == "Bridge running (pid 7); 30.0 fps, 41 ms"
    assert (
        core.status_line(sdb_supervisor.ProcessState(False, "stopped"), status) == "Bridge stopped"
    )
