"""Request and response bodies of S3 calls, moved without copies.

* :class:`BufferReader` hands botocore a caller's buffer block by block; each
  block is a slice of that memory, not a ``bytes`` copy of it.
* :func:`read_body_into` lands a GetObject body in a caller's buffer.
"""

from __future__ import annotations

import io
from typing import Any

from .base import Buffer


class BufferReader(io.RawIOBase):
    """A seekable read-only file over a buffer: botocore streams it block by block, and every
    block it gets is a slice of the caller's memory, never a copy of it."""

    def __init__(self, data: Buffer) -> None:
        super().__init__()
        self._view = memoryview(data).cast("B")
        self._pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def read(self, size: int = -1) -> memoryview:  # type: ignore[override]
        end = len(self._view) if size is None or size < 0 else min(len(self._view), self._pos + size)
        block = self._view[self._pos:end]
        self._pos = max(self._pos, end)
        return block

    def readinto(self, buffer: Any) -> int:
        target = memoryview(buffer).cast("B")
        block = self.read(len(target))
        target[: len(block)] = block
        return len(block)

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: len(self._view)}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def tell(self) -> int:
        return self._pos


def read_body_into(body: Any, target: memoryview) -> int:
    """Fill ``target`` from a GetObject body; straight from the socket when the body is not encoded.

    urllib3's own ``readinto`` reads into a new ``bytes`` and copies it; reading through the
    http.client response beneath it lands the bytes in ``target`` without that copy.
    """
    raw = getattr(body, "_raw_stream", None)
    socket_reader = getattr(raw, "_fp", None)
    direct = (socket_reader is not None and hasattr(socket_reader, "readinto")
              and not raw.headers.get("content-encoding"))
    read = socket_reader.readinto if direct else body.readinto
    filled = 0
    while filled < len(target):
        got = read(target[filled:])
        if not got:
            break
        filled += got
    if direct and socket_reader.isclosed():  # drained: the connection goes back to the pool for reuse
        raw.release_conn()
    return filled


def body_of(data: Buffer) -> bytes | bytearray | BufferReader:
    """A request body botocore accepts, without copying ``data``."""
    return data if isinstance(data, (bytes, bytearray)) else BufferReader(data)
