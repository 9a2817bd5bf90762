"""The ``parts`` of a distributed checkpoint: one metadata object per rank, listed by the manifest.

A checkpoint saved by many ranks does not put every rank's tensor table in its
manifest.  Each rank writes its own *part* (what it stored and where: DCP item
locations, chunk records, its per-rank state) create-only under the key
:func:`part_key`, named by the SHA-256 of the part's bytes; rank 0 then commits
a manifest whose ``parts`` field lists, for each rank in rank order, only
``[sha256, size, nbytes]``: the part's hash, its size in bytes and the tensor
bytes it describes.  So the manifest and the gather to rank 0 grow by one small
row per rank, never by tensors.

Keys start with the first two hex digits of the hash (``parts/<hh>/<name>/``),
like chunks (``chunks/<hh>/``): thousands of ranks writing at once spread over
256 prefixes that stay the same from one checkpoint to the next, so S3's
partitions for them, once split, keep serving every later save.  (Keys that
began with the checkpoint's name would put each new save at the end of the
key space, on a cold prefix: the sequential-key pattern S3 throttles.)  A part
is verified against the manifest's SHA-256 before it is parsed.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from ..errors import CorruptCheckpoint

#: Top-level prefix of every part object of a root.
PARTS_PREFIX = "parts/"
#: Most ranks one manifest may list.
MAX_PARTS = 1 << 20
_HEX64 = re.compile(r"^[0-9a-f]{64}$")


@dataclass(frozen=True)
class PartRef:
    """One rank's part: its rank, the SHA-256 and size of the part object, the tensor bytes it describes."""

    rank: int
    sha256: str
    size: int
    nbytes: int

    def key(self, checkpoint: str) -> str:
        return part_key(checkpoint, self.rank, self.sha256)


def part_key(checkpoint: str, rank: int, sha256: str) -> str:
    """``parts/<sha256[:2]>/<checkpoint name>/r<rank>-<sha256>.json``."""
    return f"{PARTS_PREFIX}{sha256[:2]}/{checkpoint}/r{rank:05d}-{sha256}.json"


def encode_part_refs(parts: list[PartRef]) -> list[list[Any]]:
    """The manifest's ``parts`` value: ``[sha256, size, nbytes]`` per rank, index = rank."""
    if [p.rank for p in parts] != list(range(len(parts))):
        raise ValueError("parts must be given for ranks 0..N-1 in order")
    return [[p.sha256, p.size, p.nbytes] for p in parts]


def decode_part_refs(raw: Any, where: str) -> list[PartRef] | None:
    """Validate a manifest's ``parts`` value (absent: None); CorruptCheckpoint names what is wrong."""
    if raw is None:
        return None
    if not isinstance(raw, list) or not raw or len(raw) > MAX_PARTS:
        raise CorruptCheckpoint(f"{where}: 'parts' must be a non-empty list of at most {MAX_PARTS} entries")
    refs = []
    for rank, row in enumerate(raw):
        if (not isinstance(row, list) or len(row) != 3 or not isinstance(row[0], str) or not _HEX64.match(row[0])
                or not all(type(x) is int and x >= 0 for x in row[1:])):
            raise CorruptCheckpoint(f"{where}: parts[{rank}] must be [sha256 (64 hex), size, nbytes]")
        refs.append(PartRef(rank, row[0], row[1], row[2]))
    return refs
