"""`file:<path>`: video files through PyAV, still images and image sequences through Pillow.

As a source, a video or image sequence loops at its end and a still image repeats; frames are
paced at the file's frame rate (or `fps`, 30 for images) and fitted to the requested size with
`Frame.fitted` (centre crop to the aspect ratio, then Pillow's bilinear resize).

As a sink, a video path (.mp4 .mkv .mov .avi .webm) is encoded at a constant `fps` with
H.264 (libx264) where PyAV's FFmpeg has it, else MPEG-4 part 2 (VP9 or VP8 for .webm); frames
are fitted to the size the sink was opened at, rounded down to even sides as yuv420p needs.
A path with a printf counter such as `out_%05d.png` writes one image per frame, from 0.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from bridge.io.base import Sink, Source, TransportError
from bridge.io.frame import Frame, now
from bridge.io.pacing import Pacer

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp"})
VIDEO_SUFFIXES = frozenset({".mp4", ".mkv", ".mov", ".avi", ".webm"})
DEFAULT_IMAGE_FPS = 30.0

_COUNTER = re.compile(r"%(0?\d*)d")


def open_file_source(path: str, width: int, height: int, fps: float | None = None) -> Source:
    """The source that reads `path`: an image sequence, a still image or a video."""
    if _COUNTER.search(Path(path).name):
        return ImageSequenceSource(path, width, height, fps=fps or DEFAULT_IMAGE_FPS)
    if Path(path).suffix.lower() in IMAGE_SUFFIXES:
        return StillImageSource(path, width, height, fps=fps or DEFAULT_IMAGE_FPS)
    return VideoFileSource(path, width, height, fps=fps)


def open_file_sink(
    path: str, width: int, height: int, fps: float = 30.0, codec: str | None = None
) -> Sink:
    """The sink that writes `path`: an image sequence or a video, chosen by the name."""
    suffix = Path(path).suffix.lower()
    if suffix in IMAGE_SUFFIXES:
        if not _COUNTER.search(Path(path).name):
            raise ValueError(
                f"File sink {path!r} names a single image; put a counter in the name, e.g. "
                f"{Path(path).stem}_%05d{suffix}, to write one image per frame."
            )
        return ImageSequenceSink(path)
    if suffix in VIDEO_SUFFIXES:
        return VideoFileSink(path, width, height, fps=fps, codec=codec)
    raise ValueError(
        f"File sink {path!r} has an unknown type; end it in one of "
        f"{', '.join(sorted(VIDEO_SUFFIXES | IMAGE_SUFFIXES))}."
    )


class VideoFileSource(Source):
    """Decodes a video file with PyAV and loops it, paced at its own frame rate or `fps`."""

    def __init__(self, path: str, width: int, height: int, *, fps: float | None = None):
        super().__init__()
        self.path = Path(path)
        self.width = width
        self.height = height
        self.fps = fps
        self._container: Any = None
        self._frames: Iterator[Any] | None = None
        self._pacer: Pacer | None = None
        self._index = 0
        self._next: Frame | None = None

    @property
    def connected(self) -> bool:
        return self._container is not None

    def describe(self) -> str:
        return f"file:{self.path} (video, looping)"

    def _open(self) -> None:
        _require_file(self.path)
        self._start()
        stream = self._container.streams.video[0]
        rate = self.fps or (float(stream.average_rate) if stream.average_rate else 30.0)
        self._pacer = Pacer(rate)

    def _start(self) -> None:
        av = _import_av()
        try:
            self._container = av.open(str(self.path))
        except (OSError, av.FFmpegError) as error:
            raise TransportError(
                f"Video file {str(self.path)!r} could not be opened ({error}); check that it "
                "is a video FFmpeg can decode."
            ) from error
        if not self._container.streams.video:
            self._container.close()
            self._container = None
            raise TransportError(f"File {str(self.path)!r} has no video stream; pick a video.")
        stream = self._container.streams.video[0]
        stream.thread_type = "AUTO"
        self._frames = self._container.decode(stream)

    def _stop(self) -> None:
        if self._container is not None:
            self._container.close()
            self._container = None
            self._frames = None

    def _close(self) -> None:
        self._stop()
        self._next = None

    def _read(self, timeout: float) -> Frame | None:
        # Decoded and fitted before the tick, so the frame leaves at its scheduled time; its
        # capture time is that moment, when it enters the stream.
        if self._next is None:
            self._next = self._decode_next()
        if not self._pacer.wait(timeout):
            return None
        frame = self._next
        self._next = None
        self._index += 1
        return Frame(frame.pixels, frame.pixel_format, now(), frame.index)

    def _decode_next(self) -> Frame:
        decoded = next(self._frames, None)
        if decoded is None:
            # End of file: reopening is the one way to restart that works for every container.
            self._stop()
            self._start()
            decoded = next(self._frames, None)
            if decoded is None:
                raise TransportError(
                    f"Video file {str(self.path)!r} holds no frames; pick another file."
                )
        pixels = np.ascontiguousarray(decoded.to_ndarray(format="rgb24"))
        return Frame(pixels, "rgb", now(), self._index).fitted(self.width, self.height)


class StillImageSource(Source):
    """Repeats one image at `fps`: handy to test a prompt on a fixed picture."""

    def __init__(self, path: str, width: int, height: int, *, fps: float = DEFAULT_IMAGE_FPS):
        super().__init__()
        self.path = Path(path)
        self.width = width
        self.height = height
        self.fps = fps
        self._pacer = Pacer(fps)
        self._frame: Frame | None = None
        self._index = 0

    @property
    def connected(self) -> bool:
        return self._frame is not None

    def describe(self) -> str:
        return f"file:{self.path} (still image)"

    def _open(self) -> None:
        pixels, pixel_format = _load_image(self.path)
        frame = Frame(pixels, pixel_format, now(), 0).fitted(self.width, self.height)
        frame.pixels.flags.writeable = False  # shared by every frame this source returns
        self._frame = frame
        self._pacer = Pacer(self.fps)

    def _close(self) -> None:
        self._frame = None

    def _read(self, timeout: float) -> Frame | None:
        if not self._pacer.wait(timeout):
            return None
        frame = Frame(self._frame.pixels, self._frame.pixel_format, now(), self._index)
        self._index += 1
        return frame


class ImageSequenceSource(Source):
    """Plays the images matching a printf pattern such as `in_%05d.png` in counter order."""

    def __init__(self, pattern: str, width: int, height: int, *, fps: float = DEFAULT_IMAGE_FPS):
        super().__init__()
        self.pattern = Path(pattern)
        self.width = width
        self.height = height
        self.fps = fps
        self._pacer = Pacer(fps)
        self._paths: list[Path] = []
        self._index = 0
        self._next: Frame | None = None

    @property
    def connected(self) -> bool:
        return bool(self._paths)

    def describe(self) -> str:
        return f"file:{self.pattern} (image sequence of {len(self._paths)}, looping)"

    def _open(self) -> None:
        self._paths = _sequence_paths(self.pattern)
        if not self._paths:
            raise TransportError(
                f"No files match the image sequence {str(self.pattern)!r}; check the folder "
                "and the counter width (e.g. %05d)."
            )
        self._pacer = Pacer(self.fps)

    def _close(self) -> None:
        self._paths = []
        self._next = None

    def _read(self, timeout: float) -> Frame | None:
        # Loaded and fitted before the tick, so the frame leaves at its scheduled time.
        if self._next is None:
            pixels, pixel_format = _load_image(self._paths[self._index % len(self._paths)])
            frame = Frame(pixels, pixel_format, now(), self._index)
            self._next = frame.fitted(self.width, self.height)
        if not self._pacer.wait(timeout):
            return None
        frame = self._next
        self._next = None
        self._index += 1
        return Frame(frame.pixels, frame.pixel_format, now(), frame.index)


class VideoFileSink(Sink):
    """Encodes frames into a video file at a constant frame rate."""

    keeps_every_frame = True

    def __init__(
        self, path: str, width: int, height: int, *, fps: float = 30.0, codec: str | None = None
    ):
        super().__init__()
        if width < 2 or height < 2:
            raise ValueError(f"Video size {width}x{height} is too small; use at least 2x2.")
        self.path = Path(path)
        self.width = width - width % 2
        self.height = height - height % 2
        self.fps = fps
        self.codec = codec
        self._av: Any = None
        self._container: Any = None
        self._stream: Any = None
        self.frames_written = 0

    @property
    def connected(self) -> bool:
        return self._container is not None

    def describe(self) -> str:
        codec = self._stream.codec_context.name if self._stream is not None else self.codec
        return f"file:{self.path} (video {self.width}x{self.height} @ {self.fps:g} fps, {codec})"

    def _open(self) -> None:
        av = self._av = _import_av()
        _require_folder(self.path)
        codec = self.codec or _pick_codec(self.path.suffix.lower(), av.codecs_available)
        try:
            self._container = av.open(str(self.path), mode="w")
            rate = Fraction(self.fps).limit_denominator(1001)
            stream = self._container.add_stream(codec, rate=rate)
        except (OSError, ValueError, av.FFmpegError) as error:
            if self._container is not None:
                self._container.close()
                self._container = None
            raise TransportError(
                f"Video file {str(self.path)!r} could not be created with codec {codec!r} "
                f"({error}); pick another file type or codec."
            ) from error
        stream.width = self.width
        stream.height = self.height
        stream.pix_fmt = "yuv420p"
        if codec == "libx264":
            stream.options = {"crf": "18", "preset": "veryfast"}
        self._stream = stream
        self.frames_written = 0

    def _close(self) -> None:
        for packet in self._stream.encode(None):
            self._container.mux(packet)
        self._container.close()
        self._container = None
        self._stream = None

    def _write(self, frame: Frame) -> None:
        rgb = frame.fitted(self.width, self.height).to("rgb").pixels
        video_frame = self._av.VideoFrame.from_ndarray(rgb, format="rgb24")
        video_frame.pts = self.frames_written
        for packet in self._stream.encode(video_frame):
            self._container.mux(packet)
        self.frames_written += 1


class ImageSequenceSink(Sink):
    """Saves every frame as its own image, named by the pattern's counter."""

    keeps_every_frame = True

    def __init__(self, pattern: str):
        super().__init__()
        self.pattern = Path(pattern)
        self.frames_written = 0

    @property
    def connected(self) -> bool:
        return self.is_open

    def describe(self) -> str:
        return f"file:{self.pattern} (image sequence, {self.frames_written} written)"

    def _open(self) -> None:
        _require_folder(self.pattern)
        self.frames_written = 0

    def _close(self) -> None:
        pass

    def _write(self, frame: Frame) -> None:
        path = self.pattern.with_name(self.pattern.name % self.frames_written)
        keeps_alpha = path.suffix.lower() not in {".jpg", ".jpeg", ".bmp"}
        pixel_format = "rgba" if keeps_alpha and frame.pixel_format in ("rgba", "bgra") else "rgb"
        Image.fromarray(frame.to(pixel_format).pixels).save(path)
        self.frames_written += 1


def _pick_codec(suffix: str, available: frozenset[str] | set[str]) -> str:
    preferences = ["libvpx-vp9", "libvpx"] if suffix == ".webm" else ["libx264", "mpeg4"]
    for codec in preferences:
        if codec in available:
            return codec
    raise TransportError(
        f"PyAV's FFmpeg has none of {', '.join(preferences)} to write {suffix} files; pick "
        "another file type."
    )


def _sequence_paths(pattern: Path) -> list[Path]:
    """Existing files matching a printf pattern, in counter order."""
    counter = _COUNTER.search(pattern.name)
    before, after = pattern.name[: counter.start()], pattern.name[counter.end() :]
    matcher = re.compile(re.escape(before) + r"(\d+)" + re.escape(after))
    folder = pattern.parent
    if not folder.is_dir():
        return []
    numbered = []
    for candidate in folder.iterdir():
        match = matcher.fullmatch(candidate.name)
        if match:
            numbered.append((int(match.group(1)), candidate))
    return [path for _, path in sorted(numbered)]


def _load_image(path: Path) -> tuple[np.ndarray, str]:
    """Pixels of an image file as rgb, or rgba when it has transparency."""
    _require_file(path)
    try:
        with Image.open(path) as image:
            has_alpha = image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info
            converted = image.convert("RGBA" if has_alpha else "RGB")
    except OSError as error:
        raise TransportError(
            f"Image {str(path)!r} could not be read ({error}); check that it is a picture "
            "Pillow can open."
        ) from error
    return np.array(converted, dtype=np.uint8), "rgba" if has_alpha else "rgb"


def _require_file(path: Path) -> None:
    if not path.is_file():
        raise TransportError(f"File {str(path)!r} does not exist; check the path after file:.")


def _require_folder(path: Path) -> None:
    folder = path.parent
    if not folder.is_dir():
        raise TransportError(
            f"Folder {str(folder)!r} for {path.name!r} does not exist; create it first."
        )


def _import_av() -> Any:
    try:
        import av
    except ImportError as error:
        raise TransportError(
            "Video files need PyAV, which is not installed; run "
            "pip install streamdiffusion-bridge[video]."
        ) from error
    return av
