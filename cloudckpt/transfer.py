"""How checkpoint bytes move: chunk sizes, parallelism, verification.  One small frozen config."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

MiB = 1024 * 1024
GiB = 1024 * MiB
_CGROUP_LIMITS = ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes")


def memory_limit() -> int | None:
    """The memory this process may use: physical memory, or a lower cgroup (container) limit."""
    try:
        limit = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None
    for path in _CGROUP_LIMITS:
        try:
            text = Path(path).read_text().strip()
        except OSError:
            continue
        if text.isdigit():
            limit = min(limit, int(text))
    return limit


def default_staging_budget() -> int:
    """A quarter of :func:`memory_limit`, at least 256 MiB and at most 8 GiB."""
    limit = memory_limit()
    return 256 * MiB if limit is None else max(256 * MiB, min(8 * GiB, limit // 4))


@dataclass(frozen=True)
class TransferConfig:
    """Knobs of the chunk pipeline; the defaults suit S3, GCS and local disk alike.

    chunk_size
        Tensor bytes are cut into chunks of at most this size; each chunk is one
        content-addressed object.  Boundaries are stable: a tensor's chunks start
        at its own first byte, so changing one tensor never moves another's.
    pack_threshold, pack_size
        Tensors smaller than ``pack_threshold`` are packed together (in state
        order) into chunks of at most ``pack_size``, so a model with thousands of
        small parameters costs few requests, while a change to one of them
        re-uploads one small pack, not a 64 MiB one.  ``pack_size`` defaults to
        4 MiB (bounded by ``pack_threshold`` and ``chunk_size``).
    concurrency
        Requests in flight at once: chunks uploaded in parallel (a multipart
        chunk sends up to a quarter of this many parts at a time) and ranged
        reads.  Object stores cap each connection (about 25-100 MB/s), so
        throughput comes from many connections.  Memory in flight is bounded
        by about ``concurrency * chunk_size``.
    multipart_threshold, part_size
        Chunks larger than the threshold are uploaded as multipart objects in
        ``part_size`` parts (the backend's default part size when None: 8 MiB
        for S3), so one chunk travels over several connections at once.
    range_size
        Downloads of chunks larger than this are split into parallel ranged GETs.
    compression, compression_level
        ``"zstd"`` compresses every chunk (recorded in the manifest); ``"none"``
        (default) stores raw bytes.  See ``docs/PERFORMANCE.md`` for when it pays.
    verify
        ``"store"``: after each upload, compare the size and CRC32C the store
        reports with what was sent.  ``"read-back"``: also re-read every uploaded
        chunk and re-hash it before committing (doubles the traffic).
    staging_budget
        Host memory a restore from S3 or GCS verifies chunks in before it
        writes any live tensor (see ``docs/RELIABILITY.md`` section 2).  A
        state larger than this is read twice.  Defaults to a quarter of the
        memory the process may use (a container's limit when lower), between
        256 MiB and 8 GiB.  Local roots need none: their chunk files are
        verified and copied through memory maps.
    """

    chunk_size: int = 64 * MiB
    pack_threshold: int = 1 * MiB
    pack_size: int | None = None
    concurrency: int = 16
    multipart_threshold: int = 16 * MiB
    part_size: int | None = None
    range_size: int = 8 * MiB
    verify: Literal["store", "read-back"] = "store"
    compression: Literal["none", "zstd"] = "none"
    compression_level: int = 1
    staging_budget: int = field(default_factory=default_staging_budget)

    def __post_init__(self) -> None:
        if self.pack_size is None:
            object.__setattr__(self, "pack_size", max(self.pack_threshold, min(4 * MiB, self.chunk_size)))
        for name in ("chunk_size", "pack_threshold", "pack_size", "concurrency", "multipart_threshold",
                     "range_size", "staging_budget"):
            if getattr(self, name) < 1:
                raise ValueError(f"TransferConfig.{name} must be positive, got {getattr(self, name)}")
        if not self.pack_threshold <= self.pack_size <= self.chunk_size:
            raise ValueError("TransferConfig needs pack_threshold <= pack_size <= chunk_size")
        if self.compression not in ("none", "zstd"):
            raise ValueError(f"TransferConfig.compression must be 'none' or 'zstd', got {self.compression!r}")
        if self.verify not in ("store", "read-back"):
            raise ValueError(f"TransferConfig.verify must be 'store' or 'read-back', got {self.verify!r}")
