"""Length-prefixed JSON frames, used on the zygote control socket and on instance sockets.

A frame is a 4-byte big-endian length followed by that many bytes of UTF-8 JSON.
The blocking helpers run in zygotes and instances; the async ones in the gateway process.
"""

from __future__ import annotations

import asyncio
import json
import socket
import struct
from typing import Any

HEADER = struct.Struct(">I")
MAX_FRAME_BYTES = 64 * 1024 * 1024


class ProtocolError(Exception):
    pass


def encode(message: dict[str, Any]) -> bytes:
    body = json.dumps(message, separators=(",", ":")).encode()
    return HEADER.pack(len(body)) + body


def _decode(body: bytes) -> dict[str, Any]:
    message = json.loads(body)
    if not isinstance(message, dict):
        raise ProtocolError(f"frame is not a JSON object: {body[:80]!r}")
    return message


def send(sock: socket.socket, message: dict[str, Any]) -> None:
    sock.sendall(encode(message))


def send_with_fd(sock: socket.socket, message: dict[str, Any], fd: int) -> None:
    """Send a frame and pass `fd` along with its first byte (SCM_RIGHTS)."""
    data = encode(message)
    sent = socket.send_fds(sock, [data], [fd])
    if sent < len(data):
        sock.sendall(data[sent:])


def _recv_exactly(sock: socket.socket, size: int) -> bytes | None:
    chunks = bytearray()
    while len(chunks) < size:
        chunk = sock.recv(size - len(chunks))
        if not chunk:
            if chunks:
                raise ProtocolError(f"connection closed inside a frame ({len(chunks)}/{size} bytes)")
            return None
        chunks += chunk
    return bytes(chunks)


def recv(sock: socket.socket) -> dict[str, Any] | None:
    """Read one frame; None when the peer closed the connection between frames."""
    header = _recv_exactly(sock, HEADER.size)
    if header is None:
        return None
    (size,) = HEADER.unpack(header)
    if size > MAX_FRAME_BYTES:
        raise ProtocolError(f"frame of {size} bytes exceeds the {MAX_FRAME_BYTES} byte limit")
    body = _recv_exactly(sock, size)
    if body is None:
        raise ProtocolError("connection closed after a frame header")
    return _decode(body)


def recv_with_fd(sock: socket.socket) -> tuple[dict[str, Any] | None, int | None]:
    """Read one frame that may carry a file descriptor in its first byte."""
    data, fds, _flags, _addr = socket.recv_fds(sock, HEADER.size, 1)
    fd = fds[0] if fds else None
    if not data:
        return None, fd
    header = data + (_recv_exactly(sock, HEADER.size - len(data)) or b"")
    (size,) = HEADER.unpack(header)
    body = _recv_exactly(sock, size)
    if body is None:
        raise ProtocolError("connection closed after a frame header")
    return _decode(body), fd


async def read_frame(reader: asyncio.StreamReader) -> dict[str, Any] | None:
    """Async counterpart of `recv`; None on a clean end of stream."""
    try:
        header = await reader.readexactly(HEADER.size)
    except asyncio.IncompleteReadError as error:
        if error.partial:
            raise ProtocolError("connection closed inside a frame header") from error
        return None
    (size,) = HEADER.unpack(header)
    if size > MAX_FRAME_BYTES:
        raise ProtocolError(f"frame of {size} bytes exceeds the {MAX_FRAME_BYTES} byte limit")
    try:
        body = await reader.readexactly(size)
    except asyncio.IncompleteReadError as error:
        raise ProtocolError("connection closed inside a frame") from error
    return _decode(body)
