"""The IP-Adapter in a running bridge: its picture from a file or a source, its live scale, and
one sentence for each thing that cannot work."""

from __future__ import annotations

import logging
import shutil
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from bridge.control import OscClient, ParamStore
from bridge.io import Frame, Sink, now
from bridge.io.shm_protocol import ShmReader
from bridge.runtime.engine import Engine
from bridge.runtime.image_prompt import ImagePromptInput, load_image_prompt
from bridge.runtime.launch import run_bridge
from bridge.runtime.settings import RunSettings
from bridge.runtime.side_input import SideInput
from bridge.stream import StreamConfig, StreamDiffusion
from tests.runtime.helpers import LocalSource, RecordingSink, free_port

SIZE = 64
# One step and no guidance: a frame depends on its input and the adapter, not on earlier frames.
ONE_STEP = {"t_index_list": (20,), "cfg_type": "none"}
PROMPT = "a red fox in the snow"


@pytest.fixture(autouse=True)
def synthetic_cache(monkeypatch, tmp_path_factory):
    """Synthetic models and IP-Adapters built once for this module."""
    monkeypatch.setenv("SD_BRIDGE_CACHE", str(tmp_path_factory.getbasetemp() / "ip-cache"))


def flat_picture(seed: int) -> np.ndarray:
    """Two flat colours side by side: pictures that differ at the encoder's 8-pixel patches."""
    colours = np.random.default_rng(seed).integers(0, 256, (2, 3), dtype=np.uint8)
    pixels = np.empty((48, 48, 3), dtype=np.uint8)
    pixels[:, :24], pixels[:, 24:] = colours
    return pixels


@pytest.fixture
def picture_file(tmp_path):
    path = tmp_path / "style.png"
    Image.fromarray(flat_picture(1)).save(path)
    return path


class Pictures(LocalSource):
    """Delivers `pixels` every few milliseconds until `delivering` is cleared."""

    label = "pictures"

    def __init__(self, pixels: np.ndarray) -> None:
        super().__init__()
        self.pixels = pixels
        self.delivering = True

    def _read(self, timeout: float) -> Frame | None:
        time.sleep(0.005)
        return Frame(self.pixels, "rgb", now(), 0) if self.delivering else None


class Recorder(RecordingSink):
    """Keeps every frame written to it; `last` is the newest."""

    @property
    def last(self) -> Frame | None:
        return self.frames[-1] if self.frames else None


def settings(**values) -> RunSettings:
    base = {
        "model": "synthetic:tiny",
        "width": SIZE,
        "height": SIZE,
        "output": ("null",),
        "osc": False,
        "quiet": True,
        "ip_adapter": "synthetic:tiny",
    }
    return RunSettings(**{**base, **values})


def load(**values):
    """The tiny model with the IP-Adapter of `settings(**values)`, as the bridge loads them."""
    from bridge.models import load_components

    components = load_components("synthetic:tiny", vae="tiny")
    return components, load_image_prompt(settings(**values), components)


def wait_for(condition, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.01)


def output_of(components, scale: float, tokens) -> np.ndarray:
    """The frame a fresh pipeline makes from the still input at `scale` with `tokens`."""
    config = StreamConfig(width=SIZE, height=SIZE, **ONE_STEP)
    stream = StreamDiffusion(components, config, prompt=PROMPT)
    stream.image_prompt.set_scale(scale)
    stream.image_prompt.set_image_tokens(tokens)
    return stream.img2img(still()).copy()


def still() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)


def run_engine(components, image_prompt, store: ParamStore, sink: Sink):
    """An engine on a still input, started on its own thread; returns (stop, thread)."""
    config = StreamConfig(width=SIZE, height=SIZE, **ONE_STEP)
    stream = StreamDiffusion(components, config, prompt=PROMPT)
    engine = Engine(stream, store, Pictures(still()), [sink], image_prompt=image_prompt)
    stop = threading.Event()
    thread = threading.Thread(target=engine.run, args=(stop,), daemon=True)
    thread.start()
    return stop, thread


def store_with(scale: float) -> ParamStore:
    return ParamStore({"prompt": PROMPT, **ONE_STEP, "ip_adapter_scale": scale})


def close_to(got: Frame | None, expected: np.ndarray) -> bool:
    return got is not None and np.abs(got.pixels.astype(int) - expected).max() <= 1


def test_a_scale_sent_to_the_store_reaches_the_output(picture_file):
    components, image_prompt = load(ip_adapter_image=str(picture_file))
    tokens = image_prompt.prompt.image_tokens()
    expected = {scale: output_of(components, scale, tokens) for scale in (0.6, 0.0)}
    assert np.abs(expected[0.6].astype(int) - expected[0.0]).mean() > 2
    store, sink = store_with(0.6), Recorder()
    stop, thread = run_engine(components, image_prompt, store, sink)
    try:
        wait_for(lambda: close_to(sink.last, expected[0.6]))
        store.set("ip_adapter_scale", 0.0)
        wait_for(lambda: close_to(sink.last, expected[0.0]))
    finally:
        stop.set()
        thread.join(30)


def test_the_picture_follows_its_source_and_stays_when_the_source_goes(picture_file):
    components, loaded = load(ip_adapter_image=str(picture_file))
    adapter, prompt = loaded.adapter, loaded.prompt
    tokens = {seed: adapter.image_tokens(flat_picture(seed)) for seed in (2, 3)}
    expected = {seed: output_of(components, 0.6, tokens[seed]) for seed in (2, 3)}
    source, said = Pictures(flat_picture(2)), []
    side = SideInput("IP-Adapter image", source, say=said.append, loss_after=0.2)
    image_prompt = ImagePromptInput(adapter, prompt, picture="pictures", side=side)
    sink = Recorder()
    stop, thread = run_engine(components, image_prompt, store_with(0.6), sink)
    try:
        wait_for(lambda: close_to(sink.last, expected[2]))
        source.pixels = flat_picture(3)
        wait_for(lambda: close_to(sink.last, expected[3]))
        encoded = image_prompt.pictures
        source.delivering = False
        wait_for(lambda: said == ["IP-Adapter image pictures is gone; keeping its last frame."])
        written = len(sink.frames)
        wait_for(lambda: len(sink.frames) >= written + 3)
        assert close_to(sink.last, expected[3])
        assert image_prompt.pictures == encoded
        assert len(said) == 1
    finally:
        stop.set()
        thread.join(30)


def refusal(**values) -> list[str]:
    """What `run_bridge` says when it refuses to start with these settings (exit code 2)."""
    # run_bridge sets up the bridge's loggers for a terminal; other tests read them with caplog.
    loggers = [logging.getLogger(name) for name in ("sd_bridge", "bridge")]
    saved = [(logger.handlers[:], logger.level, logger.propagate) for logger in loggers]
    said: list[str] = []
    try:
        assert run_bridge(settings(**values), say=said.append) == 2
    finally:
        for logger, (handlers, level, propagate) in zip(loggers, saved, strict=True):
            logger.handlers, logger.level, logger.propagate = handlers, level, propagate
    return said


def test_a_missing_image_encoder_is_one_sentence_naming_the_folder_and_the_fix(
    picture_file, tmp_path
):
    from bridge.models.ip_adapter import resolve_ip_adapter

    alone = tmp_path / "adapters" / "ip-adapter_tiny.safetensors"
    alone.parent.mkdir()
    shutil.copy(resolve_ip_adapter("synthetic:tiny"), alone)
    assert refusal(ip_adapter=str(alone), ip_adapter_image=str(picture_file)) == [
        f"sd-bridge: the IP-Adapter's image encoder is not in {alone.parent / 'image_encoder'}; "
        "put the image_encoder folder it was trained with beside the weights (as "
        "h94/IP-Adapter has it), or name its folder with ip_adapter_image_encoder=FOLDER."
    ]


def test_an_ip_adapter_of_another_family_is_one_sentence_naming_both(picture_file, tmp_path):
    # The shapes of an SD 2.x adapter (1024-wide tokens) for a UNet with the tiny one's layers.
    weights = {"image_proj.proj.weight": torch.zeros(4 * 1024, 16)}
    weights["image_proj.proj.bias"] = torch.zeros(4 * 1024)
    weights["image_proj.norm.weight"] = torch.ones(1024)
    weights["image_proj.norm.bias"] = torch.zeros(1024)
    for key_id, width in ((1, 32), (3, 32), (5, 32), (7, 64)):
        for name in ("to_k_ip", "to_v_ip"):
            weights[f"ip_adapter.{key_id}.{name}.weight"] = torch.zeros(width, 1024)
    path = tmp_path / "ip-adapter_sd21.safetensors"
    save_file(weights, str(path))
    (said,) = refusal(ip_adapter=str(path), ip_adapter_image=str(picture_file))
    assert said.startswith(
        "sd-bridge: IP-Adapter ip-adapter_sd21.safetensors is made for SD 2.x (4 cross-attention "
        "layers, 1024-wide text tokens) but synthetic:tiny"
    )
    assert said.endswith("is SD 1.x (4 layers, 32-wide); use an IP-Adapter trained for SD 1.x, "
                         "or a model of its family.")  # fmt: skip


def test_an_ip_adapter_without_a_picture_is_refused_before_anything_loads():
    assert refusal(ip_adapter_image="") == [
        "sd-bridge: ip_adapter needs a picture to follow; give ip_adapter_image=PATH (a PNG or "
        "JPEG file) or a source URI such as ip_adapter_image=shm:style."
    ]


def run_cli(*argv: str) -> subprocess.CompletedProcess:
    """`sd-bridge` in a fresh interpreter that also reports whether torch was imported."""
    code = (
        "import sys; from bridge.cli import main; code = main(sys.argv[1:]); "
        "print('torch loaded' if 'torch' in sys.modules else 'torch not loaded'); sys.exit(code)"
    )
    return subprocess.run(
        [sys.executable, "-c", code, *argv], capture_output=True, text=True, timeout=120
    )


def test_a_picture_file_that_is_no_picture_is_refused_before_torch_loads(tmp_path):
    text = tmp_path / "style.png"
    text.write_text("not a picture")
    result = run_cli(
        "run", "--ip-adapter", "ip-adapter_sd15.safetensors", "--ip-adapter-image", str(text)
    )
    assert result.returncode == 2
    assert result.stderr.strip() == (
        f"sd-bridge: --ip-adapter-image {text} is not a picture Pillow can read; give a PNG or "
        "JPEG file, or a source URI such as shm:style."
    )
    assert result.stdout.strip() == "torch not loaded"


def wait_for_a_changed_frame(reader: ShmReader, process) -> None:
    """Read frames until one differs from the first read."""
    first = None
    deadline = time.monotonic() + 90
    while True:
        assert process.poll() is None, process.communicate()[1]
        assert time.monotonic() < deadline, "no frame changed"
        got = reader.read()
        if got is None:
            time.sleep(0.005)
        elif first is None:
            first = got[0].copy()
        elif not np.array_equal(got[0], first):
            return


def test_sd_bridge_run_follows_the_newest_frame_of_a_source(bridge_process, shm_name, tmp_path):
    from bridge.models.ip_adapter import resolve_ip_adapter

    # The weights in one folder, the image encoder named apart.
    weights = resolve_ip_adapter("synthetic:tiny")
    alone = tmp_path / "adapters" / weights.name
    alone.parent.mkdir()
    shutil.copy(weights, alone)
    still_file = tmp_path / "still.png"
    Image.fromarray(still()).save(still_file)
    name, port = shm_name(), free_port()
    process = bridge_process(
        "--model", "synthetic:tiny", "--width", "64", "--height", "64", "--quiet",
        "--input", f"file:{still_file}", "--output", f"shm:{name}", "--osc-port", str(port),
        "--t-index-list", "20", "--cfg", "none",
        "--ip-adapter", str(alone), "--ip-adapter-image", "pattern:gradient",
        "--ip-adapter-image-encoder", str(weights.parent / "image_encoder"),
    )  # fmt: skip
    deadline = time.monotonic() + 90
    reader = None
    while reader is None:
        assert time.monotonic() < deadline and process.poll() is None, process.communicate()
        try:
            reader = ShmReader(name)
        except Exception:
            time.sleep(0.05)
    with OscClient("127.0.0.1", port, timeout=2.0) as client, reader:
        # The input and the noise stand still: only the moving pattern's picture changes frames.
        wait_for_a_changed_frame(reader, process)
        assert client.get("/sd/ipadapter/scale") == [pytest.approx(0.6)]
        client.send("/sd/ipadapter/scale", 1.5)
        assert client.get("/sd/ipadapter/scale") == [1.5]
