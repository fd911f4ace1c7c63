"""file: sources and sinks on real files: video through PyAV, images through Pillow."""

from __future__ import annotations

import time

import numpy as np
import pytest
from PIL import Image

from bridge.io import Frame, TransportError, open_sink, open_source

av = pytest.importorskip("av")


def solid(colour, height=48, width=64, pixel_format="rgb") -> np.ndarray:
    return np.full((height, width, len(pixel_format)), colour, np.uint8)


def close_to(pixels: np.ndarray, colour, tolerance: int = 12) -> bool:
    centre = pixels[pixels.shape[0] // 2, pixels.shape[1] // 2, :3].astype(int)
    return bool(np.all(np.abs(centre - np.array(colour)) <= tolerance))


def test_video_written_by_the_sink_reads_back_in_order_and_loops(tmp_path):
    colours = [(220, 40, 40), (40, 220, 40), (40, 40, 220), (230, 230, 230)]
    path = tmp_path / "out.mp4"
    with open_sink(f"file:{path}", width=64, height=48, fps=30) as sink:
        for index, colour in enumerate(colours):
            sink.write(Frame(solid(colour), "rgb", 0.0, index))

    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        assert (stream.width, stream.height) == (64, 48)
        assert stream.codec_context.name in {"h264", "mpeg4"}

    with open_source(f"file:{path}?fps=500", width=32, height=32) as source:
        frames = [source.read(timeout=1.0) for _ in range(len(colours) + 2)]
    assert all(f.pixels.shape == (32, 32, 3) and f.pixel_format == "rgb" for f in frames)
    expected = colours + colours[:2]  # the source starts over at the end
    matches = [
        close_to(frame.pixels, colour) for frame, colour in zip(frames, expected, strict=True)
    ]
    assert matches == [True] * len(expected)


def test_video_sink_fits_frames_to_even_sides(tmp_path):
    path = tmp_path / "odd.mkv"
    with open_sink(f"file:{path}", width=33, height=21) as sink:
        sink.write(Frame(solid((9, 9, 9, 255), 100, 100, "bgra"), "bgra", 0.0, 0))
    with av.open(str(path)) as container:
        decoded = next(container.decode(video=0))
    assert (decoded.width, decoded.height) == (32, 20)


def test_video_source_paces_at_the_files_own_rate(tiny_video):
    with open_source(f"file:{tiny_video}", width=64, height=48) as source:
        source.read(timeout=1.0)
        started = time.perf_counter()
        for _ in range(3):
            source.read(timeout=1.0)
        elapsed = time.perf_counter() - started
    assert 0.06 < elapsed < 0.6  # three frames at 30 fps take 0.1 s


def test_image_sequence_sink_writes_one_lossless_image_per_frame(tmp_path):
    pattern = tmp_path / "seq_%03d.png"
    frames = [solid((i * 40, 10, 200, 128 + i), 8, 8, "rgba") for i in range(3)]
    with open_sink(f"file:{pattern}", width=8, height=8) as sink:
        for index, pixels in enumerate(frames):
            sink.write(Frame(pixels, "rgba", 0.0, index))
    written = sorted(path.name for path in tmp_path.iterdir())
    assert written == ["seq_000.png", "seq_001.png", "seq_002.png"]
    for name, pixels in zip(written, frames, strict=True):
        assert np.array_equal(np.array(Image.open(tmp_path / name)), pixels)


def test_image_sequence_source_plays_files_in_counter_order_and_loops(tmp_path):
    for number, value in [(10, 30), (2, 10), (5, 20)]:
        Image.fromarray(solid((value, value, value), 8, 8)).save(tmp_path / f"in_{number}.png")
    with open_source(f"file:{tmp_path / 'in_%d.png'}?fps=500", width=8, height=8) as source:
        values = [int(source.read(timeout=1.0).pixels[0, 0, 0]) for _ in range(4)]
    assert values == [10, 20, 30, 10]


def test_still_image_repeats_as_new_frames_of_the_requested_size(tmp_path):
    path = tmp_path / "still.png"
    Image.fromarray(solid((10, 20, 30, 40), 50, 100, "rgba")).save(path)
    with open_source(f"file:{path}?fps=500", width=40, height=40) as source:
        first, second = source.read(timeout=1.0), source.read(timeout=1.0)
    assert first.pixels.shape == (40, 40, 4) and first.pixel_format == "rgba"
    assert np.array_equal(first.pixels, second.pixels)
    assert (first.index, second.index) == (0, 1)
    assert second.capture_time > first.capture_time


def test_missing_file_is_named_in_the_error(tmp_path):
    with pytest.raises(TransportError, match="missing.mp4' does not exist; check the path"):
        open_source(f"file:{tmp_path / 'missing.mp4'}", width=8, height=8)


def test_file_that_is_not_a_video_is_refused_in_one_sentence(tmp_path):
    path = tmp_path / "junk.mp4"
    path.write_text("not a video")
    with pytest.raises(TransportError, match="could not be opened .*; check that it is a video"):
        open_source(f"file:{path}", width=8, height=8)


def test_single_image_sink_asks_for_a_counter(tmp_path):
    with pytest.raises(ValueError, match=r"e\.g\. out_%05d\.png"):
        open_sink(f"file:{tmp_path / 'out.png'}", width=8, height=8)


def test_unknown_sink_file_type_lists_the_known_ones(tmp_path):
    with pytest.raises(ValueError, match=r"unknown type; end it in one of .*\.mp4"):
        open_sink(f"file:{tmp_path / 'out.xyz'}", width=8, height=8)


def test_sink_into_a_missing_folder_says_to_create_it(tmp_path):
    with pytest.raises(TransportError, match="does not exist; create it first"):
        open_sink(f"file:{tmp_path / 'nowhere' / 'out.mp4'}", width=8, height=8)


def test_a_video_frame_is_decoded_before_its_tick_so_it_leaves_on_time(tiny_video):
    with open_source(f"file:{tiny_video}?fps=4", width=64, height=48) as source:
        assert source.read(timeout=1.0).index == 0
        decoded: list[int] = []
        decode = source._decode_next
        source._decode_next = lambda: decoded.append(source._index) or decode()
        assert source.read(timeout=0.0) is None  # frame 1 is not due yet ...
        assert decoded == [1]  # ... but is decoded already
        frame = source.read(timeout=2.0)
    assert frame.index == 1 and decoded == [1]  # handed over at its tick, no decoding then
