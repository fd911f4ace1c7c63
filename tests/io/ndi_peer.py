"""The other process of the NDI tests: a sender or a receiver on NDIlib alone, run as a script.

It never imports the `bridge` package: what it sends and what it reports is NDI as any other
application sees it. Senders and receivers find each other by asking 127.0.0.1 directly (mDNS
may find nothing here), which reaches the one NDI sender process the tests run at a time.

    python ndi_peer.py sender NAME WIDTH HEIGHT FPS FOURCC SECONDS BASE
    python ndi_peer.py receiver NAME COUNT SECONDS

A sender sends solid frames: frame n has RGB `colour(BASE + n)` (UYVY: grey level `grey(...)`),
and metadata in the bridge's format with the capture time; it prints "ready", then one line
"sent N CAPTURE_TIME" per frame. A receiver prints one JSON object: the address it connected
to and, per frame, its size, FourCC, centre pixel as RGB and metadata.
"""

from __future__ import annotations

import json
import socket
import sys
import time

import numpy as np

LOCAL = "127.0.0.1"


def colour(n: int) -> tuple[int, int, int]:
    """RGB of frame n: red and green move apart, blue stays, so a channel swap shows."""
    level = 30 + (n * 37) % 190
    return level, 255 - level, 60


def grey(n: int) -> int:
    """Studio-range luma (16-235) of UYVY frame n."""
    return 16 + (n * 37) % 220


def grey_as_rgb(y: int) -> int:
    """The full-range RGB level NDI decodes studio-range luma `y` to."""
    return round((y - 16) * 255 / 219)


def make_pixels(n: int, width: int, height: int, four_cc: str) -> np.ndarray:
    """The pixels of frame n in `four_cc`'s byte layout."""
    if four_cc == "UYVY":
        pixels = np.empty((height, width, 2), np.uint8)
        pixels[..., 0] = 128  # U and V alternate in byte 0: no colour
        pixels[..., 1] = grey(n)
        return pixels
    red, green, blue = colour(n)
    by_channel = {"R": red, "G": green, "B": blue, "A": 255, "X": 255}
    values = [by_channel[channel] for channel in four_cc]
    return np.ascontiguousarray(np.broadcast_to(np.array(values, np.uint8), (height, width, 4)))


def find(ndi, name: str, seconds: float):
    """The NDI source whose name ends in "(name)", asking this machine; None if not in time."""
    finder = ndi.find_create_v2(ndi.FindCreate(True, None, LOCAL))
    try:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            ndi.find_wait_for_sources(finder, 200)
            for source in ndi.find_get_current_sources(finder):
                if source.ndi_name.endswith(f"({name})"):
                    return ndi.Source(source.ndi_name, source.url_address)
        return None
    finally:
        ndi.find_destroy(finder)


def run_sender(
    name: str, width: int, height: int, fps: float, four_cc: str, seconds: float, base: int
) -> None:
    import NDIlib as ndi

    if not ndi.initialize():
        raise SystemExit("the NDI runtime did not start")
    sender = ndi.send_create(ndi.SendCreate(name, clock_video=False))
    print("ready", flush=True)
    host = socket.gethostname()
    end = time.monotonic() + seconds
    n = 0
    while time.monotonic() < end:
        video = ndi.VideoFrameV2()
        video.data = make_pixels(base + n, width, height, four_cc)
        video.FourCC = getattr(ndi, f"FOURCC_VIDEO_TYPE_{four_cc}")
        capture = time.perf_counter()
        video.metadata = f'<sd_bridge capture_time="{capture:.6f}" host="{host}" index="{n}"/>'
        print(f"sent {base + n} {capture:.6f}", flush=True)  # before the frame can arrive
        ndi.send_send_video_v2(sender, video)
        n += 1
        time.sleep(1.0 / fps)
    ndi.send_destroy(sender)


def run_receiver(name: str, count: int, seconds: float) -> None:
    import NDIlib as ndi

    if not ndi.initialize():
        raise SystemExit("the NDI runtime did not start")
    deadline = time.monotonic() + seconds
    source = find(ndi, name, seconds)
    if source is None:
        raise SystemExit(f"no NDI source named {name!r} was found")
    settings = ndi.RecvCreateV3(source)
    settings.color_format = ndi.RECV_COLOR_FORMAT_RGBX_RGBA
    receiver = ndi.recv_create_v3(settings)
    frames = []
    while len(frames) < count and time.monotonic() < deadline:
        kind, video, _, _ = ndi.recv_capture_v2(receiver, 100, want_audio=False)
        if kind != ndi.FRAME_TYPE_VIDEO:
            continue
        centre = video.data[video.yres // 2, video.xres // 2, :3].tolist()
        frames.append(
            {
                "size": [video.xres, video.yres],
                "four_cc": video.FourCC.name.rpartition("_")[2],
                "rgb": centre,
                "metadata": video.metadata,
            }
        )
        ndi.recv_free_video_v2(receiver, video)
    ndi.recv_destroy(receiver)
    print(json.dumps({"url": source.url_address, "frames": frames}), flush=True)


if __name__ == "__main__":
    role, *arguments = sys.argv[1:]
    if role == "sender":
        name, width, height, fps, four_cc, seconds, base = arguments
        run_sender(name, int(width), int(height), float(fps), four_cc, float(seconds), int(base))
    else:
        name, count, seconds = arguments
        run_receiver(name, int(count), float(seconds))
