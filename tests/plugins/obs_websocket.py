"""A small obs-websocket 5 client (standard library only) for driving a real OBS in tests.

It speaks just enough of RFC 6455 (masked text frames out, unmasked frames in) and of the
obs-websocket protocol (Hello, Identify without authentication, Request) to send requests such
as TriggerHotkeyByName.
"""

from __future__ import annotations

import base64
import json
import os
import socket
import struct
import time
from itertools import count
from typing import Any

_IDENTIFY, _IDENTIFIED, _REQUEST, _REQUEST_RESPONSE = 1, 2, 6, 7


class ObsWebSocket:
    """A connection to obs-websocket on 127.0.0.1 with authentication off."""

    def __init__(self, port: int, timeout: float = 10.0) -> None:
        self._sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self._buffer = b""
        self._ids = count(1)
        key = base64.b64encode(os.urandom(16)).decode()
        self._sock.sendall(
            (
                "GET / HTTP/1.1\r\n"
                f"Host: 127.0.0.1:{port}\r\n"
                "Upgrade: websocket\r\nConnection: Upgrade\r\n"
                f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
                "Sec-WebSocket-Protocol: obswebsocket.json\r\n\r\n"
            ).encode()
        )
        while b"\r\n\r\n" not in self._buffer:
            self._buffer += self._recv()
        head, self._buffer = self._buffer.split(b"\r\n\r\n", 1)
        if b" 101 " not in head.split(b"\r\n", 1)[0]:
            raise ConnectionError(f"obs-websocket refused the upgrade: {head[:80]!r}")
        hello = self._receive_json()
        self._send_json({"op": _IDENTIFY, "d": {"rpcVersion": hello["d"]["rpcVersion"]}})
        if self._receive_json()["op"] != _IDENTIFIED:
            raise ConnectionError("obs-websocket did not identify this client")

    def request(self, request_type: str, data: dict[str, Any] | None = None) -> dict[str, Any]:
        """Send a request and return its response's `d`; raise if OBS reports a failure."""
        request_id = str(next(self._ids))
        payload = {"requestType": request_type, "requestId": request_id}
        if data is not None:
            payload["requestData"] = data
        self._send_json({"op": _REQUEST, "d": payload})
        while True:
            message = self._receive_json()
            if message["op"] == _REQUEST_RESPONSE and message["d"]["requestId"] == request_id:
                status = message["d"]["requestStatus"]
                if not status["result"]:
                    raise RuntimeError(f"{request_type} failed: {status}")
                return message["d"]

    def close(self) -> None:
        self._sock.close()

    def _send_json(self, message: dict[str, Any]) -> None:
        payload = json.dumps(message).encode()
        mask = os.urandom(4)
        if len(payload) < 126:
            header = struct.pack(">BB", 0x81, 0x80 | len(payload))
        else:
            header = struct.pack(">BBH", 0x81, 0x80 | 126, len(payload))
        masked = bytes(byte ^ mask[i % 4] for i, byte in enumerate(payload))
        self._sock.sendall(header + mask + masked)

    def _receive_json(self) -> dict[str, Any]:
        while True:
            opcode, payload = self._receive_frame()
            if opcode == 0x1:
                return json.loads(payload)
            if opcode == 0x8:
                raise ConnectionError("obs-websocket closed the connection")

    def _receive_frame(self) -> tuple[int, bytes]:
        first, second = self._take(2)
        length = second & 0x7F
        if length == 126:
            (length,) = struct.unpack(">H", self._take(2))
        elif length == 127:
            (length,) = struct.unpack(">Q", self._take(8))
        return first & 0x0F, self._take(length)

    def _take(self, size: int) -> bytes:
        deadline = time.monotonic() + self._sock.gettimeout()
        while len(self._buffer) < size:
            if time.monotonic() > deadline:
                raise TimeoutError("obs-websocket sent nothing in time")
            self._buffer += self._recv()
        taken, self._buffer = self._buffer[:size], self._buffer[size:]
        return taken

    def _recv(self) -> bytes:
        data = self._sock.recv(65536)
        if not data:
            raise ConnectionError("obs-websocket closed the connection")
        return data
