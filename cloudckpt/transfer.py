"""How checkpoint bytes move: chunk sizes, parallelism, verification.  One small frozen config."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

MiB = 1024 * 1024


@dataclass(frozen=True)
class TransferConfig:
    """Knobs of the chunk pipeline; the defaults suit S3, GCS and local disk alike.

    chunk_size
        Tensor bytes are cut into chunks of at most this size; each chunk is one
        content-addressed object.  Boundaries are stable: a tensor's chunks start
        at its own first byte, so changing one tensor never moves another's.
    pack_threshold
        Tensors smaller than this are packed together (in state order) into
        chunks, so a model with thousands of small parameters costs few requests.
    concurrency
        Chunks (and multipart parts / ranged reads) in flight at once.  Memory
        in flight is bounded by about ``concurrency * chunk_size``.
    multipart_threshold, part_size
        Chunks larger than the threshold are uploaded as multipart objects in
        ``part_size`` parts (the backend's default part size when None).
    range_size
        Downloads of chunks larger than this are split into parallel ranged GETs.
    verify
        ``"store"``: after each upload, compare the size and CRC32C the store
        reports with what was sent.  ``"read-back"``: also re-read every uploaded
        chunk and re-hash it before committing (doubles the traffic).
    """

    chunk_size: int = 64 * MiB
    pack_threshold: int = 4 * MiB
    concurrency: int = 8
    multipart_threshold: int = 32 * MiB
    part_size: int | None = None
    range_size: int = 16 * MiB
    verify: Literal["store", "read-back"] = "store"

    def __post_init__(self) -> None:
        for name in ("chunk_size", "pack_threshold", "concurrency", "multipart_threshold", "range_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"TransferConfig.{name} must be positive, got {getattr(self, name)}")
        if self.pack_threshold > self.chunk_size:
            raise ValueError("TransferConfig.pack_threshold must not exceed chunk_size")
        if self.verify not in ("store", "read-back"):
            raise ValueError(f"TransferConfig.verify must be 'store' or 'read-back', got {self.verify!r}")
