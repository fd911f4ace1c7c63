"""Frame transports: sources and sinks chosen by URI (spout: cam: vcam shm: file: pattern: null
ndi: syphon:).

    from bridge.io import open_source, open_sink

    with open_source("pattern:bars", width=512, height=512) as source, \\
            open_sink("shm:sd-out", width=512, height=512) as sink:
        frame = source.read(timeout=1.0)
        if frame is not None:
            sink.write(frame)

Transports know nothing of diffusion; optional libraries (SpoutGL, OpenCV, pyvirtualcam, PyAV,
ndi-python, syphon-python) are imported only when their transport opens.
"""

from bridge.io.base import Sink, Source, TransportError
from bridge.io.frame import PIXEL_FORMATS, Frame, now
from bridge.io.transports import (
    SCHEMES,
    Device,
    TransportInfo,
    TransportUri,
    available_transports,
    enumerate_devices,
    open_sink,
    open_source,
    parse_uri,
)

__all__ = [
    "PIXEL_FORMATS",
    "SCHEMES",
    "Device",
    "Frame",
    "Sink",
    "Source",
    "TransportError",
    "TransportInfo",
    "TransportUri",
    "available_transports",
    "enumerate_devices",
    "now",
    "open_sink",
    "open_source",
    "parse_uri",
]
