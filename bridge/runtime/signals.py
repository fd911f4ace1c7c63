"""Ctrl-C and SIGTERM set a stop event instead of raising in the middle of a frame."""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def stop_on_signals(stop: threading.Event | None = None) -> Iterator[threading.Event]:
    """An event that SIGINT, SIGTERM (and SIGBREAK on Windows) set; handlers restored after."""
    stop = stop if stop is not None else threading.Event()
    names = ["SIGINT", "SIGTERM", "SIGBREAK"]
    wanted = [getattr(signal, name) for name in names if hasattr(signal, name)]
    previous = {}
    if threading.current_thread() is threading.main_thread():
        for number in wanted:
            previous[number] = signal.signal(number, lambda *_: stop.set())
    try:
        yield stop
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)
