"""The picture an IP-Adapter follows: a file read at start, or the newest frame of a source.

`ip_adapter_image` names either a picture file (PNG, JPEG, anything Pillow reads), read once at
start, or a source URI (`shm:style`, `spout:Style`, `ndi:...`, `pattern:gradient`, ...), read
as a side input whose newest frame wins (`SideInput`). Nothing over OSC names a file.

A picture becomes image tokens on a worker thread (and CUDA stream) of its own, as prompts do
(image_encoder.py): the CLIP image encoder never runs on the frame path. Between two frames the
engine calls `ImagePromptInput.advance`, which hands a newly arrived frame to the worker and
copies finished tokens into the tensor the UNet reads. When the source goes away the last tokens
stay in use (`SideInput` says so once). The scale, `ip_adapter_scale`, is a tensor overwritten in
place: neither a new picture nor a new scale needs a graph capture. This module loads no torch
until an IP-Adapter is loaded, so that settings are checked before the slow imports.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from bridge.io import open_source
from bridge.io.transports import SCHEMES, check_uri

from .side_input import SideInput

if TYPE_CHECKING:
    from bridge.models.ip_adapter import IPAdapter
    from bridge.stream.ip_adapter import ImagePrompt

log = logging.getLogger("sd_bridge")

IMAGE_TOPIC = "/sd/ipadapter/image"
"""The address `/sd/error` names for what concerns the IP-Adapter's picture."""
ROLE = "IP-Adapter image"


def is_source_uri(text: str) -> bool:
    """Whether `ip_adapter_image` names a source (`scheme:...`) rather than a picture file.

    A one-letter scheme is a Windows drive (`C:\\style.png`), not a source.
    """
    scheme, colon, _ = text.partition(":")
    return bool(colon) and len(scheme) > 1 and scheme.lower() in SCHEMES


def read_picture(path: str) -> np.ndarray:
    """The pixels of a picture file as uint8 RGB (H, W, 3), or one sentence saying what is wrong."""
    file = Path(path).expanduser()
    fix = "give a PNG or JPEG file, or a source URI such as shm:style"
    if not file.is_file():
        raise FileNotFoundError(
            f"ip_adapter_image={path!r} does not exist ({file.absolute()}); {fix}."
        )
    try:
        with Image.open(file) as image:
            return np.array(image.convert("RGB"), dtype=np.uint8)
    except (OSError, ValueError):
        raise ValueError(
            f"ip_adapter_image={path!r} is not a picture Pillow can read; {fix}."
        ) from None


def check_image_prompt(settings: Any) -> None:
    """Check the IP-Adapter settings before anything loads: both or neither of the adapter and
    its picture, a source URI that parses, a picture file that reads."""
    if settings.ip_adapter and not settings.ip_adapter_image:
        raise ValueError(
            "ip_adapter needs a picture to follow; give ip_adapter_image=PATH (a PNG or JPEG "
            "file) or a source URI such as ip_adapter_image=shm:style."
        )
    if settings.ip_adapter_image and not settings.ip_adapter:
        raise ValueError(
            "ip_adapter_image needs an IP-Adapter to follow it; give ip_adapter=FILE (e.g. "
            "h94/IP-Adapter's models/ip-adapter_sd15.safetensors)."
        )
    if not settings.ip_adapter_image:
        return
    if is_source_uri(settings.ip_adapter_image):
        check_uri(settings.ip_adapter_image, "source")
    else:
        read_picture(settings.ip_adapter_image)


class ImagePromptInput:
    """What the engine drives between frames: the IP-Adapter's picture and its live scale.

    `adapter` encodes pictures; `prompt` holds the tensors the UNet reads. With `side` the picture
    follows that source's newest frame; without, it stays the one given at start.
    """

    def __init__(
        self,
        adapter: IPAdapter,
        prompt: ImagePrompt,
        *,
        picture: str,
        side: SideInput | None = None,
        say: Callable[[str], None] | None = None,
    ) -> None:
        self.adapter = adapter
        self.prompt = prompt
        self.picture = picture
        self.side = side
        self.pictures = 0
        self._worker = None
        if side is not None:
            from .image_encoder import ImageEncoderWorker  # torch: not before settings are checked

            self._worker = ImageEncoderWorker(
                adapter.image_tokens, prompt.tokens.device, ROLE, say or log.warning
            )

    def describe(self) -> str:
        """One line for the start-up log."""
        scale = float(self.prompt.scale)
        return (
            f"IP-Adapter {self.adapter.path.name} following {self.picture} at scale {scale:g}, "
            "live at /sd/ipadapter/scale"
        )

    def start(self, stop: threading.Event) -> None:
        """Start reading the picture's source (if it has one) and the encoder's thread."""
        if self.side is not None and self._worker is not None:
            self.side.start(stop)
            self._worker.start()

    def stop(self) -> None:
        """Stop the encoder's thread and wait for the source's (after `stop` was set)."""
        if self.side is not None and self._worker is not None:
            self._worker.stop()
            self.side.join()

    def set_scale(self, scale: float) -> None:
        """Weigh the picture by `scale` from the next frame on; 0 turns the adapter off."""
        self.prompt.set_scale(scale)

    def advance(self) -> None:
        """Between two frames: pass on a new frame of the source, swap in finished tokens."""
        if self.side is None or self._worker is None:
            return
        frame = self.side.poll()
        if frame is not None:
            self._worker.request(frame)
        encoded = self._worker.take()
        if encoded is not None:
            encoded.wait()
            self.prompt.set_image_tokens(encoded.tokens)
            encoded.release()
            self.pictures += 1


def load_image_prompt(
    settings: Any,
    components: Any,
    *,
    say: Callable[[str], None] | None = None,
) -> ImagePromptInput | None:
    """Load the IP-Adapter of `settings` onto `components` and open its picture; None without.

    Call it before building the pipeline: the pipeline finds the adapter on the UNet. A picture
    file is encoded here, once; a source is opened and read once the engine runs. `say` reports
    the source going and coming back.
    """
    if not settings.ip_adapter:
        return None
    from bridge.models.ip_adapter import load_ip_adapter
    from bridge.stream.ip_adapter import install

    adapter = load_ip_adapter(components, settings.ip_adapter, settings.ip_adapter_image_encoder)
    prompt = install(components.unet, adapter.empty_tokens(), settings.ip_adapter_scale)
    picture = settings.ip_adapter_image
    if not is_source_uri(picture):
        prompt.set_image_tokens(adapter.image_tokens(read_picture(picture)))
        return ImagePromptInput(adapter, prompt, picture=picture, say=say)
    source = open_source(picture, width=settings.width, height=settings.height, fps=settings.fps)
    side = SideInput(ROLE, source, say=say or log.warning)
    return ImagePromptInput(adapter, prompt, picture=picture, side=side, say=say)
