"""ControlNets in the running bridge: the setting's syntax, control inputs, live values, a run."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from bridge.control import OscClient, ParamStore
from bridge.io.shm_protocol import ShmWriter
from bridge.runtime.controlnets import (
    ControlInputs,
    ControlNetEntry,
    check_controlnets,
    controlnet_families,
    parse_controlnet,
)
from bridge.runtime.engine import Engine
from bridge.stream import ControlNet, StreamConfig, StreamDiffusion
from tests.runtime.helpers import free_port
from tests.runtime.test_side_input import fed_depth

TINY_CONTROLNET = "synthetic:controlnet-tiny"


@pytest.mark.parametrize(
    ("text", "entry"),
    [
        (
            "lllyasviel/control_v11p_sd15_canny",
            ControlNetEntry("lllyasviel/control_v11p_sd15_canny"),
        ),
        ("models/depth@passthrough", ControlNetEntry("models/depth", "passthrough")),
        ("cn@shm:depth@0.5", ControlNetEntry("cn", "shm:depth", 0.5)),
        ("cn@@0.25", ControlNetEntry("cn", "canny", 0.25)),
        ("C:\\cn.safetensors@canny", ControlNetEntry("C:\\cn.safetensors", "canny")),
        ("cn@ndi:Cam?url=127.0.0.1:5961", ControlNetEntry("cn", "ndi:Cam?url=127.0.0.1:5961")),
        ("cn@file:/clips/take@2x.mp4@0.5", ControlNetEntry("cn", "file:/clips/take@2x.mp4", 0.5)),
        (
            "cn@ndi:Cam?url=127.0.0.1:5961@1.5",
            ControlNetEntry("cn", "ndi:Cam?url=127.0.0.1:5961", 1.5),
        ),
    ],
)
def test_an_entry_is_model_at_source_at_scale_with_canny_and_1_when_left_out(text, entry):
    assert parse_controlnet(text) == entry
    assert entry.uri == (None if entry.source in ("canny", "passthrough") else entry.source)


@pytest.mark.parametrize(
    ("text", "sentence"),
    [
        ("@canny", "controlnet '@canny' names no model; write MODEL@SOURCE@SCALE, e.g. "),
        ("cn@canny@strong", "ends in scale 'strong', which is not a number; write MODEL@SOURC"),
        ("cn@shmm:depth", "takes its control image from 'shmm:depth', which is no source: "),
        ("cn@depth", "takes its control image from 'depth', which is no source: "),
    ],
)
def test_a_bad_entry_is_one_sentence_naming_it_and_the_fix(text, sentence):
    with pytest.raises(ValueError) as refused:
        parse_controlnet(text)
    assert str(refused.value).startswith(f"controlnet {text!r} ")
    assert sentence in str(refused.value)
    assert "\n" not in str(refused.value)


def test_txt2img_refuses_a_control_image_made_from_the_input():
    assert check_controlnets(["cn@pattern:bars"], "txt2img")[0].uri == "pattern:bars"
    with pytest.raises(ValueError, match="controlnet 0 makes its control image from the input"):
        check_controlnets(["cn@canny"], "txt2img")


class RecordingStack:
    """Stands for the pipeline's ControlStack and records what it is told."""

    def __init__(self) -> None:
        self.calls: list[tuple] = []

    def set_scale(self, index: int, scale: float) -> None:
        self.calls.append(("scale", index, scale))

    def set_enabled(self, index: int, enabled: bool) -> None:
        self.calls.append(("enabled", index, enabled))

    def set_canny(self, index: int, low: float, high: float) -> None:
        self.calls.append(("canny", index, low, high))

    def set_image(self, index: int, pixels: np.ndarray, pixel_format: str) -> None:
        self.calls.append(("image", index, pixels.shape, int(pixels[0, 0, 0])))


def test_control_frames_are_copied_in_newest_first_and_another_size_is_said_once():
    source = fed_depth()
    entries = [ControlNetEntry("a", "canny"), ControlNetEntry("b", "fed:depth")]
    controls = ControlInputs(entries, [None, source], width=8, height=6)
    stack = RecordingStack()
    controls.attach(stack)
    said: list[tuple[str, str]] = []
    stop = threading.Event()
    controls.start(stop, lambda address, sentence: said.append((address, sentence)))
    try:
        controls.poll()
        assert stack.calls == []  # nothing came yet: the pipeline keeps its picture
        source.feed()
        poll_until_copied(controls, stack, count=1)
        source.feed()
        poll_until_copied(controls, stack, count=2)
    finally:
        stop.set()
        controls.join()
    assert stack.calls == [("image", 1, (8, 8, 3), 0), ("image", 1, (8, 8, 3), 1)]
    assert said == [
        ("/sd/controlnet/1", "control input 1 fed:depth sends 8x8 frames; resizing them to 8x6.")
    ]


def poll_until_copied(controls: ControlInputs, stack: RecordingStack, count: int) -> None:
    for _ in range(500):
        controls.poll()
        if len(stack.calls) >= count:
            return
        time.sleep(0.01)
    raise AssertionError("the control input never delivered the frame fed to it")


def test_store_changes_reach_the_controlnets_through_the_engine(tiny, tmp_path):
    from bridge.models.controlnet import load_controlnet

    model = load_controlnet(TINY_CONTROLNET, tiny.unet.config, cache_dir=tmp_path)
    entries = [ControlNetEntry("a", "fed:depth", 0.8)]
    config = StreamConfig(width=32, height=32, t_index_list=(32,), cfg_type="none", mode="txt2img")
    stream = StreamDiffusion(tiny, config, controlnets=[ControlNet(model, "image", scale=0.8)])
    store = ParamStore(families=controlnet_families(entries))
    controls = ControlInputs(entries, [fed_depth()], width=32, height=32)
    controls.attach(stream.controlnets)
    engine = Engine(stream, store, None, [], controls=controls)
    engine.apply(store.snapshot())
    store.set_many(
        {
            "controlnet_0_scale": 0.3,
            "controlnet_0_enable": False,
            "controlnet_0_canny_low": 20.0,
        }
    )
    engine.apply(store.snapshot())
    assert stream.controlnets.scales[0].item() == pytest.approx(0.3)
    assert stream.controlnets.enabled == [False]
    assert stream.controlnets.thresholds[0].tolist() == [20.0, 200.0]
    key = stream.graph_key(stream.txt2img(), "rgb")
    store.set("controlnet_0_enable", True)
    engine.apply(store.snapshot())
    assert stream.graph_key(stream.txt2img(), "rgb") != key


def test_sd_bridge_run_with_a_control_input_takes_live_values_and_says_when_it_goes(
    bridge_process, shm_name
):
    name = shm_name()
    port = free_port()
    writer = ShmWriter(name, 64, 64, "rgba")
    process = bridge_process(
        "--model", "synthetic:tiny", "--width", "64", "--height", "64",
        "--input", "pattern:bars", "--output", "null", "--osc-port", str(port),
        "--controlnet", f"{TINY_CONTROLNET}@shm:{name}@0.5",
        "--controlnet", f"{TINY_CONTROLNET}@canny",
    )  # fmt: skip
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(process.stderr), daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + 90
        while not any("| frames " in line for line in lines):  # a status line: frames flow
            assert process.poll() is None and time.monotonic() < deadline, "".join(lines)
            time.sleep(0.1)
        with OscClient("127.0.0.1", port, timeout=1.0) as client:
            assert client.get("/sd/controlnet/0/scale") == [0.5]
            for index in range(3):
                writer.write(np.full((64, 64, 4), 60 * index, np.uint8))
                time.sleep(0.1)
            client.send("/sd/controlnet/1/scale", 1.5)
            client.send("/sd/controlnet/1/canny/low", 30.0)
            client.send("/sd/controlnet/0/enable", 0)
            client.send("/sd/controlnet/2/scale", 1.0)
            errors = [r for r in iter(lambda: client.receive(0.5), None) if r[0] == "/sd/error"]
            assert [error[1][0] for error in errors] == ["/sd/controlnet/2/scale"]
            assert client.get("/sd/controlnet/1/scale") == [1.5]
            assert client.get("/sd/controlnet/0/enable") == [0]
            time.sleep(2.0)  # no control frame for longer than a side input waits
            client.send("/sd/quit")
        assert process.wait(timeout=30) == 0, "".join(lines)
        reader.join(5)
    finally:
        writer.close()
    stderr = "".join(lines)
    assert f"ControlNet {TINY_CONTROLNET} on shm:{name} at scale 0.5, live at" in stderr
    gone = [line for line in lines if line.startswith(f"control input 0 shm:{name}")]
    assert len(gone) == 1 and gone[0].endswith("is gone; keeping its last frame.\n")
    assert int(stderr.rsplit("stopped after ", 1)[1].split()[0]) > 0


def test_sd_bridge_run_refuses_a_control_source_that_does_not_parse(bridge_process):
    process = bridge_process(
        "--model", "synthetic:tiny", "--output", "null",
        "--controlnet", f"{TINY_CONTROLNET}@spot:Kinect",
    )  # fmt: skip
    _, stderr = process.communicate(timeout=30)
    assert process.returncode == 2
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(
        f"sd-bridge: controlnet '{TINY_CONTROLNET}@spot:Kinect' takes its control image from "
        "'spot:Kinect', which is no source:"
    )
