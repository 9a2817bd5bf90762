"""Checksums and content hashes used by every layer (no dependencies on the rest of cloudckpt).

* CRC32C (Castagnoli) is the fast integrity checksum, the one S3 and GCS can
  check server-side.  Hex here; base64 of the big-endian bytes on the wire.
* BLAKE3 names chunks by content (collision-resistant, ~3 GB/s a core).
"""

from __future__ import annotations

import base64
import functools

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


def crc32c_b64_from_hex(value: str) -> str:
    return base64.b64encode(int(value, 16).to_bytes(4, "big")).decode("ascii")


def crc32c_combine(first: int, second: int, second_length: int) -> int:
    """CRC32C of ``a + b`` from ``crc32c(a)``, ``crc32c(b)`` and ``len(b)``, without reading a byte.

    So the CRCs of a chunk's parts (the ones S3 checks) give the whole chunk's CRC (the one the
    manifest records) and no byte is checksummed twice.
    """
    if second_length == 0:
        return first  # the CRC of nothing is 0
    return _apply(_zeros_operator(second_length), first) ^ second


# CRC32C (reflected, polynomial 0x82F63B78) is linear over GF(2): appending n zero bytes to a
# message maps its CRC (before the final xor, which cancels out here) through a 32x32 bit matrix.
# A matrix is a list of 32 columns; column i is the image of bit i.
_POLYNOMIAL = 0x82F63B78


def _apply(matrix: tuple[int, ...], vector: int) -> int:
    result, bit = 0, 0
    while vector:
        if vector & 1:
            result ^= matrix[bit]
        vector >>= 1
        bit += 1
    return result


def _compose(outer: tuple[int, ...], inner: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(_apply(outer, column) for column in inner)


@functools.lru_cache(maxsize=64)
def _power_of_two_zeros(exponent: int) -> tuple[int, ...]:
    """The operator of appending 2**exponent zero bytes."""
    if exponent == 0:
        one_bit = (_POLYNOMIAL,) + tuple(1 << i for i in range(31))
        two_bits = _compose(one_bit, one_bit)
        four_bits = _compose(two_bits, two_bits)
        return _compose(four_bits, four_bits)
    half = _power_of_two_zeros(exponent - 1)
    return _compose(half, half)


@functools.lru_cache(maxsize=64)
def _zeros_operator(length: int) -> tuple[int, ...]:
    """The operator of appending ``length`` zero bytes (cached: a chunk's parts have one or two lengths)."""
    operator = tuple(1 << i for i in range(32))
    exponent = 0
    while length:
        if length & 1:
            operator = _compose(_power_of_two_zeros(exponent), operator)
        length >>= 1
        exponent += 1
    return operator


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
