"""Length-prefixed frames: a 4-byte big-endian length, then a msgpack body.

Two ends: ``SyncFrames`` for the sandbox child (blocking socket, many threads
writing) and ``TrioFrames`` for the supervisor. A reader refuses a frame longer than
its limit *before* reading it, so a hostile child cannot make the supervisor buffer
more than one frame's worth.
"""

from __future__ import annotations

import socket
import struct
import threading
from typing import Final

import trio

from .protocol import ProtocolError

__all__ = ["SyncFrames", "TrioFrames"]

_HEADER: Final = struct.Struct(">I")


class SyncFrames:
    """Blocking frames over a socket; ``send`` is safe from any thread."""

    def __init__(self, sock: socket.socket, receive_limit: int) -> None:
        self._sock = sock
        self._limit = receive_limit
        self._send_lock = threading.Lock()

    def send(self, body: bytes) -> None:
        with self._send_lock:
            self._sock.sendall(_HEADER.pack(len(body)) + body)

    def send_many(self, bodies: list[bytes]) -> None:
        """Several frames in one write (one wake-up of the reader for all of them)."""
        data = b"".join(_HEADER.pack(len(body)) + body for body in bodies)
        with self._send_lock:
            self._sock.sendall(data)

    def _read_exact(self, size: int) -> bytes:
        chunks = bytearray()
        while len(chunks) < size:
            chunk = self._sock.recv(min(size - len(chunks), 1 << 20))
            if not chunk:
                raise EOFError("the other end closed the channel")
            chunks += chunk
        return bytes(chunks)

    def receive(self) -> bytes:
        """The next frame's body; EOFError at the end, ProtocolError if oversized."""
        (size,) = _HEADER.unpack(self._read_exact(_HEADER.size))
        if size > self._limit:
            raise ProtocolError(f"frame of {size} bytes exceeds the limit of {self._limit}")
        return self._read_exact(size)


class TrioFrames:
    """Frames over a trio stream (the supervisor's end of a sandbox channel)."""

    def __init__(self, stream: trio.abc.Stream, receive_limit: int) -> None:
        self._stream = stream
        self._limit = receive_limit
        self._buffer = bytearray()
        self._send_lock = trio.StrictFIFOLock()

    async def send(self, body: bytes) -> None:
        async with self._send_lock:
            await self._stream.send_all(_HEADER.pack(len(body)) + body)

    async def _fill(self, size: int) -> None:
        while len(self._buffer) < size:
            chunk = await self._stream.receive_some(max(65536, size - len(self._buffer)))
            if not chunk:
                raise EOFError("the sandbox closed its channel")
            self._buffer += chunk

    async def receive(self) -> bytes:
        """The next frame's body; EOFError at the end, ProtocolError if oversized."""
        await self._fill(_HEADER.size)
        (size,) = _HEADER.unpack_from(self._buffer)
        if size > self._limit:
            raise ProtocolError(f"frame of {size} bytes exceeds the limit of {self._limit}")
        await self._fill(_HEADER.size + size)
        body = bytes(self._buffer[_HEADER.size : _HEADER.size + size])
        del self._buffer[: _HEADER.size + size]
        return body

    async def aclose(self) -> None:
        await self._stream.aclose()
