"""Checksums and content hashes used by every layer (no dependencies on the rest of cloudckpt).

* CRC32C (Castagnoli) is the fast integrity checksum, the one S3 and GCS can
  check server-side.  Hex here; base64 of the big-endian bytes on the wire.
* BLAKE3 names chunks by content (collision-resistant, ~3 GB/s a core).
"""

from __future__ import annotations

import base64

import blake3 as _blake3
import google_crc32c
import numpy as np

def crc32c(data) -> int:
    """CRC32C of a bytes-like object as an int."""
    return google_crc32c.value(_as_bytes_like(data))


def crc32c_hex(data) -> str:
    """CRC32C as 8 lowercase hex digits (the form manifests store)."""
    return f"{crc32c(data):08x}"


def crc32c_b64(data) -> str:
    """CRC32C as base64 of its 4 big-endian bytes (the form S3 and GCS headers use)."""
    return base64.b64encode(crc32c(data).to_bytes(4, "big")).decode("ascii")


def crc32c_hex_from_b64(value: str) -> str:
    return f"{int.from_bytes(base64.b64decode(value), 'big'):08x}"


def blake3_hex(data) -> str:
    """BLAKE3-256 of a bytes-like object, hex.

    Single-threaded on purpose: callers hash several chunks in parallel (the
    GIL is released while hashing), and a background save must not take every
    core from the training loop.
    """
    view = data if isinstance(data, bytes) else memoryview(data).cast("B")
    return _blake3.blake3(view).hexdigest()


def _as_bytes_like(data):
    # The crc32c extension refuses memoryviews but reads numpy arrays without a copy.
    if isinstance(data, bytes):
        return data
    return np.frombuffer(memoryview(data).cast("B"), dtype=np.uint8)
