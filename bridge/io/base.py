"""What every transport is: a `Source` that frames come out of, or a `Sink` they go into."""

from __future__ import annotations

from abc import ABC, abstractmethod
from types import TracebackType

from bridge.io.frame import Frame


class TransportError(RuntimeError):
    """A transport could not be opened or used; the message names the thing and the fix."""


class _Transport(ABC):
    """Open/close bookkeeping shared by sources and sinks; `open` and `close` are idempotent."""

    def __init__(self) -> None:
        self._is_open = False

    def open(self) -> None:
        """Acquire the device, file or segment; does nothing if already open."""
        if not self._is_open:
            self._open()
            self._is_open = True

    def close(self) -> None:
        """Release everything `open` acquired; does nothing if not open."""
        if self._is_open:
            self._is_open = False
            self._close()

    @property
    def is_open(self) -> bool:
        """Whether `open` succeeded and `close` has not been called since."""
        return self._is_open

    @property
    @abstractmethod
    def connected(self) -> bool:
        """Whether frames are flowing: the peer, device or file is there right now."""

    @abstractmethod
    def describe(self) -> str:
        """One line for status displays, starting with the URI scheme."""

    @abstractmethod
    def _open(self) -> None: ...

    @abstractmethod
    def _close(self) -> None: ...

    def _require_open(self) -> None:
        if not self._is_open:
            raise TransportError(f"{self.describe()} is not open; call open() before using it.")

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.describe()}>"


class Source(_Transport):
    """Where frames come from. Use as a context manager, or call `open` and `close`."""

    def read(self, timeout: float = 1.0) -> Frame | None:
        """The next new frame, waiting at most `timeout` seconds; None if none came in time."""
        self._require_open()
        return self._read(timeout)

    @abstractmethod
    def _read(self, timeout: float) -> Frame | None: ...

    def __enter__(self) -> Source:
        self.open()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()


class Sink(_Transport):
    """Where frames go. Use as a context manager, or call `open` and `close`."""

    # A recording wants every frame even if it falls behind a little; a live output wants only
    # the newest one.
    keeps_every_frame = False

    def write(self, frame: Frame) -> None:
        """Send one frame on; a sink of any size takes frames of any size (see each sink)."""
        self._require_open()
        self._write(frame)

    @abstractmethod
    def _write(self, frame: Frame) -> None: ...

    def __enter__(self) -> Sink:
        self.open()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()
