"""uint8 frames in the layouts video tools use, to and from the VAE's float tensors.

Frames are HxWxC (or NxHxWxC) uint8 arrays or tensors; C is 3 for "rgb"/"bgr" and 4 for
"rgba"/"bgra". Conversion runs on the pipeline's device: a frame is copied there as bytes, and
only then widened to floats, so a 512x512 RGBA frame crosses the bus as 1 MiB, not 4 or 8.
A frame uploaded on a stream of its own is noted with its upload's event (`mark_uploaded`), so
that work needing only that frame can start before earlier GPU work ends.
"""

from __future__ import annotations

import weakref

import numpy as np
import torch

# Named apart from bridge.io's Frame and PIXEL_FORMATS: a frame here is a bare array.
FORMAT_CHANNELS = {"rgb": 3, "bgr": 3, "rgba": 4, "bgra": 4}

PixelArray = np.ndarray | torch.Tensor


def format_channels(pixel_format: str) -> int:
    """The channel count of a pixel format, or ValueError listing the known formats."""
    try:
        return FORMAT_CHANNELS[pixel_format]
    except KeyError:
        known = ", ".join(FORMAT_CHANNELS)
        raise ValueError(f"pixel format {pixel_format!r} is unknown; use one of {known}.") from None


def check_frame(frame: object, pixel_format: str, height: int, width: int, count: int) -> None:
    """Raise ValueError unless `frame` is uint8 (H, W, C), or (N, H, W, C) with N == count."""
    if not isinstance(frame, (np.ndarray, torch.Tensor)):
        raise ValueError(
            f"a frame must be a numpy array or a torch tensor, got {type(frame).__name__}."
        )
    channels = format_channels(pixel_format)
    if frame.dtype not in (np.uint8, torch.uint8):
        raise ValueError(f"a frame must be uint8, got dtype {frame.dtype}.")
    expected = (height, width, channels)
    shape = tuple(frame.shape)
    allowed = [(count, *expected)] if count > 1 else [expected, (1, *expected)]
    if shape not in allowed:
        wanted = " or ".join(str(a) for a in allowed)
        raise ValueError(
            f"frame shape {shape} does not match {wanted}: {count} {pixel_format} frame(s) "
            f"of {width}x{height}."
        )


def to_device_pixels(frame: PixelArray, device: torch.device) -> torch.Tensor:
    """uint8 (N,)HxWxC frames as an (N, H, W, C) uint8 tensor on `device`."""
    if isinstance(frame, np.ndarray):
        frame = torch.from_numpy(np.ascontiguousarray(frame))
    pixels = frame.to(device, non_blocking=True)
    return pixels.unsqueeze(0) if pixels.dim() == 3 else pixels


# Frames uploaded on a stream of their own (bridge.runtime.transfer does), by id, with the event
# after which each is on its device; see `upload_event`.
_UPLOADS: dict[int, tuple[weakref.ref, torch.cuda.Event]] = {}


def mark_uploaded(pixels: torch.Tensor, ready: torch.cuda.Event) -> None:
    """Note that `pixels` are on their device once `ready` has passed, whatever else is queued."""
    for key, (alive, _) in list(_UPLOADS.items()):
        if alive() is None:
            _UPLOADS.pop(key, None)
    _UPLOADS[id(pixels)] = (weakref.ref(pixels), ready)


def upload_event(frame: object) -> torch.cuda.Event | None:
    """The event after which an uploaded frame is on its device; None for any other frame.

    Work that needs only the frame (the similarity filter) may wait for this event alone, rather
    than for the caller's stream, where the previous frame step may still be queued.
    """
    entry = _UPLOADS.get(id(frame))
    if entry is None or entry[0]() is not frame:
        return None
    return entry[1]


def to_model_input(pixels: torch.Tensor, pixel_format: str, dtype: torch.dtype) -> torch.Tensor:
    """uint8 (N, H, W, C) pixels to an (N, 3, H, W) tensor in [-1, 1] on the same device."""
    rgb = pixels[..., :3]
    if pixel_format.startswith("bgr"):
        rgb = rgb.flip(-1)
    images = rgb.permute(0, 3, 1, 2).to(dtype)
    return images / 127.5 - 1.0


def from_model_output(images: torch.Tensor, pixel_format: str) -> torch.Tensor:
    """(N, 3, H, W) images in [-1, 1] to uint8 (N, H, W, C) on the same device."""
    pixels = ((images.float().clamp(-1.0, 1.0) + 1.0) * 127.5).round().to(torch.uint8)
    pixels = pixels.permute(0, 2, 3, 1)
    if pixel_format.startswith("bgr"):
        pixels = pixels.flip(-1)
    if format_channels(pixel_format) == 4:
        alpha = torch.full_like(pixels[..., :1], 255)
        pixels = torch.cat([pixels, alpha], dim=-1)
    return pixels.contiguous()


def like_input(pixels: torch.Tensor, reference: PixelArray) -> PixelArray:
    """Give the output back as the caller gave the input: numpy or tensor, one frame or a batch."""
    if reference.ndim == 3:
        pixels = pixels[0]
    if isinstance(reference, np.ndarray):
        return pixels.cpu().numpy()
    # A copy: the pipeline may overwrite its output buffer on the next frame.
    return pixels.clone()
