"""The one check that bounds what a manifest can make a reader allocate, by what its chunks hold.

Each tensor's own segments are checked where it is parsed (in order, inside
their chunk, covering it).  That is not enough: segments of many tensors may
all name the same bytes of one chunk, so a small manifest and one 4 KiB chunk
could declare gigabytes of tensors.  :func:`check_layout` adds the rules that
hold across tensors, before anything is allocated or read:

* no two segments overlap within one chunk entry, so every byte a reader
  places comes from a distinct byte of a chunk entry;
* the tensors' sizes add up to the segments' lengths.

Together with "inside the chunk" this bounds the tensor bytes by the sum of
the chunk entries' ``raw_size``.  Used for checkpoint manifests and for the
DCP metadata (``cloudckpt.integrations._dcp_metadata``).
"""

from __future__ import annotations

from typing import Sequence

from ..errors import CorruptCheckpoint
from .serialize import Segment


def check_layout(owners: Sequence[tuple[int, Sequence[Segment]]], where: str, what: str = "tensors") -> None:
    """Raise CorruptCheckpoint unless the segments of ``owners`` (``(nbytes, segments)`` per tensor or
    item, ``what`` names them in errors) are disjoint within each chunk and add up to their sizes."""
    declared = placed = 0
    ranges: list[tuple[int, int, int, int]] = []  # chunk index, start, end, owner
    for owner, (nbytes, segments) in enumerate(owners):
        declared += nbytes
        for segment in segments:
            placed += segment.length
            if segment.length:
                ranges.append((segment.chunk_index, segment.chunk_offset, segment.chunk_offset + segment.length,
                               owner))
    if declared != placed:
        raise CorruptCheckpoint(f"{where}: the {what} declare {declared} bytes, their segments hold {placed}")
    ranges.sort()
    for (chunk, _, end, first), (next_chunk, start, _, second) in zip(ranges, ranges[1:]):
        if chunk == next_chunk and start < end:
            raise CorruptCheckpoint(
                f"{where}: {what}[{first}] and {what}[{second}] both take bytes from offset {start} of chunk "
                f"{chunk}; segments of one chunk may not overlap (a manifest cannot declare more bytes than "
                "its chunks hold)")
