"""Cutting a tensor table into chunks with stable boundaries, and where each tensor's bytes then lie.

:func:`plan_chunks` is what makes deduplication work across saves: a large
tensor's chunk boundaries depend only on that tensor, and small tensors are
packed in table order into small packs (docs/FORMAT.md, section 7).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from .dtypes import TensorRecord


@dataclass(frozen=True, slots=True)
class Slice:
    """``length`` bytes of tensor ``tensor_index`` from ``tensor_offset``, at ``chunk_offset`` in a chunk."""

    tensor_index: int
    tensor_offset: int
    chunk_offset: int
    length: int


@dataclass(frozen=True, slots=True)
class Segment:
    """``length`` bytes of a tensor from ``tensor_offset``, at ``chunk_offset`` of chunk ``chunk_index``."""

    chunk_index: int
    chunk_offset: int
    tensor_offset: int
    length: int


@dataclass
class ChunkPlan:
    """How a tensor table is cut into chunks, seen from both sides.

    ``chunks[c]`` lists the slices chunk ``c`` holds, back to back from offset 0;
    ``segments[t]`` lists where tensor ``t``'s bytes lie, in tensor order.
    """

    chunks: list[list[Slice]]
    segments: list[list[Segment]]

    def chunk_nbytes(self, index: int) -> int:
        """Size of chunk ``index`` in bytes."""
        return sum(piece.length for piece in self.chunks[index])


def plan_chunks(
    records: Sequence[TensorRecord], *, chunk_size: int, pack_threshold: int, pack_size: int | None = None
) -> ChunkPlan:
    """Cut a tensor table into chunks of at most ``chunk_size`` bytes, with stable boundaries.

    A tensor of ``nbytes >= pack_threshold`` gets chunks of its own, cut at
    multiples of ``chunk_size`` from its own start, so no other tensor can move
    its boundaries.  Smaller tensors are packed, in table order, into shared
    chunks of at most ``pack_size`` bytes (``chunk_size`` when None); a new pack
    starts when the next one would overflow.  Small packs keep a change to one
    small tensor from dirtying much else.  Zero-byte tensors occupy no chunk.
    """
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    pack_size = chunk_size if pack_size is None else pack_size
    if not pack_threshold <= pack_size <= chunk_size:
        raise ValueError(
            f"need pack_threshold ({pack_threshold}) <= pack_size ({pack_size}) <= chunk_size ({chunk_size})"
        )
    planner = _Planner(len(records), chunk_size, pack_size)
    for index, record in enumerate(records):
        if record.nbytes == 0:
            continue
        if record.nbytes >= pack_threshold:
            planner.own(index, record.nbytes)
        else:
            planner.pack(index, record.nbytes)
    return planner.plan


class _Planner:
    def __init__(self, count: int, chunk_size: int, pack_size: int) -> None:
        self.plan = ChunkPlan(chunks=[], segments=[[] for _ in range(count)])
        self._chunk_size = chunk_size
        self._pack_size = pack_size
        self._fill: list[int] = []  # bytes placed in each chunk so far
        self._pack: int | None = None  # the pack chunk small tensors go to

    def own(self, index: int, nbytes: int) -> None:
        """Give a tensor chunks of its own, cut at multiples of chunk_size from its start."""
        for offset in range(0, nbytes, self._chunk_size):
            self._place(self._new_chunk(), index, offset, min(self._chunk_size, nbytes - offset))

    def pack(self, index: int, nbytes: int) -> None:
        """Append a whole small tensor to the open pack, opening a new one if it would overflow."""
        if self._pack is None or self._fill[self._pack] + nbytes > self._pack_size:
            self._pack = self._new_chunk()
        self._place(self._pack, index, 0, nbytes)

    def _new_chunk(self) -> int:
        self.plan.chunks.append([])
        self._fill.append(0)
        return len(self._fill) - 1

    def _place(self, chunk_index: int, tensor_index: int, tensor_offset: int, length: int) -> None:
        chunk_offset = self._fill[chunk_index]
        self.plan.chunks[chunk_index].append(Slice(tensor_index, tensor_offset, chunk_offset, length))
        self.plan.segments[tensor_index].append(Segment(chunk_index, chunk_offset, tensor_offset, length))
        self._fill[chunk_index] += length
