"""Reading a checkpoint as a transaction: no live tensor is written before every chunk has verified.

:func:`stage_tensors` reads every chunk a restore needs and checks it (size,
CRC32C, decompression, and BLAKE3 with ``full_verify``).  Tensors that nobody
sees yet (new CPU tensors for ``load()`` or for destinations of another dtype)
are filled as their chunks arrive.  Bytes bound for *live* tensors (a module's
parameters, an optimizer's buffers, on any device) wait in a bounded
:class:`~cloudckpt.staging.StagingPool`; only :meth:`StagedRead.commit` copies
them in, and the caller commits after it has decoded and checked the rest of
the state too.

Memory and reads, for ``B`` = ``TransferConfig.staging_budget`` and ``L`` =
the bytes of the chunks holding live tensors:

* ``L <= B`` (one pass): the verified chunks stay staged; ``commit()`` is a
  memory copy.  If anything fails, no live byte was written.
* ``L > B`` (two passes): the first pass streams every chunk through the pool,
  verifying and dropping it; ``commit()`` reads and verifies each chunk again
  and copies it in.  A damaged, missing or unreadable chunk fails the first
  pass, with the live state untouched.  Only a failure of the second pass (the
  store failing, or a chunk vanishing, after the whole checkpoint verified)
  leaves a mix, and raises :class:`~cloudckpt.errors.PartialRestore`.

A store that lends stable views of its objects (:meth:`~cloudckpt.storage.base.Storage.lend`:
a local root's memory-mapped chunk files) needs neither: its uncompressed chunks are verified
through the views, which are held until ``commit()`` copies from them.

Holding ``L`` bytes would double the memory of a large restore; reading twice
halves its speed.  The budget picks between them: small states (and every
state when the budget is raised above it) get both guarantees at one read.
"""

from __future__ import annotations

import threading
from typing import Callable
from dataclasses import dataclass, field

import torch

from .errors import CorruptCheckpoint, PartialRestore
from .format.dtypes import TensorRecord, empty_from_record
from .format.manifest import Manifest
from .parallel import run_parallel
from .reader import ChunkFetcher, ReadStats, check_chunk_sizes
from .staging import StagingPool, byte_view, copy_bytes, settle, wants_pinned
from .storage.base import Storage
from .transfer import TransferConfig


@dataclass(frozen=True)
class _Piece:
    """``length`` bytes of one chunk's content at ``chunk_offset`` -> tensor ``tensor`` at ``tensor_offset``."""

    tensor: int
    chunk_offset: int
    tensor_offset: int
    length: int


def _compatible(dest: torch.Tensor | None, record: TensorRecord) -> bool:
    return (
        dest is not None
        and dest.dtype == record.torch_dtype
        and list(dest.shape) == list(record.shape)
        and dest.is_contiguous()
        and not dest.requires_grad
    )


@dataclass
class StagedRead:
    """A verified read whose bytes for live tensors are not yet written (see the module doc)."""

    tensors: dict[int, torch.Tensor]
    stats: ReadStats
    _live: dict[int, torch.Tensor]
    _pieces: dict[int, list[_Piece]]
    _held: dict[int, torch.Tensor]
    _reread: list[int]
    _fetcher: ChunkFetcher
    _pool: StagingPool
    _manifest: Manifest
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _done: bool = False

    def commit(self) -> None:
        """Write the staged bytes into the live tensors (the second pass when over budget)."""
        if self._done:
            raise RuntimeError("this staged read was already committed or released")
        views = {i: byte_view(t) for i, t in self._live.items()}
        try:
            run_parallel(lambda item: self._copy_live(item[0], item[1], views), list(self._held.items()),
                         workers=self._fetcher.transfer.concurrency, name="cloudckpt-commit")
            settle(list(self._live.values()))
            if self._reread:
                self._second_pass(views)
        finally:
            self.release()

    def release(self) -> None:
        """Free the staging memory without writing anything (after a failure elsewhere)."""
        if self._done:
            return
        self._done = True
        self._held.clear()
        self._fetcher.close()
        self._pool.close()
        self.stats.staging_peak = self._pool.peak

    def _copy_live(self, index: int, buffer: torch.Tensor, views: dict[int, torch.Tensor]) -> None:
        for piece in self._pieces[index]:
            if piece.tensor in views:
                copy_bytes(views[piece.tensor], piece.tensor_offset, buffer, piece.chunk_offset, piece.length)

    def _second_pass(self, views: dict[int, torch.Tensor]) -> None:
        written = [0]

        def reread(index: int) -> None:
            ref = self._manifest.chunks[index]
            buffer = self._pool.take(ref.raw_size)
            try:
                self._fetcher.fetch_into(ref, _memory(buffer, ref.raw_size))
                self._copy_live(index, buffer, views)
                settle([self._live[p.tensor] for p in self._pieces[index] if p.tensor in self._live])
            finally:
                self._pool.give(buffer)
            with self._lock:
                written[0] += 1
                self.stats.chunks_read += 1
                self.stats.bytes_read += ref.size

        try:
            run_parallel(reread, self._reread, workers=self._fetcher.transfer.concurrency, name="cloudckpt-commit")
        except Exception as exc:
            raise PartialRestore(
                f"{self._fetcher.store.url}/{self._manifest.name} verified completely, but reading it again "
                f"into the live tensors failed after {written[0]} of {len(self._reread)} chunks were written "
                f"({exc}). The live state is now a mix of two checkpoints: restore again before training. "
                "A larger TransferConfig.staging_budget avoids the second read."
            ) from exc


def _memory(buffer: torch.Tensor, nbytes: int) -> memoryview:
    return buffer[:nbytes].numpy().data


def _bounded_by_live(manifest: Manifest, index: int, pieces: list[_Piece], live: dict[int, torch.Tensor]) -> bool:
    """Whether an uncompressed chunk holds nothing but bytes of live tensors (which bound its size)."""
    ref = manifest.chunks[index]
    return not ref.key.endswith(".zst") and sum(p.length for p in pieces if p.tensor in live) == ref.raw_size


def _plain(manifest: Manifest, indices: set[int]) -> set[int]:
    """The uncompressed chunks among ``indices``: their stored bytes are their content."""
    return {i for i in indices if not manifest.chunks[i].key.endswith(".zst")}


def _first_lent(fetcher: ChunkFetcher, manifest: Manifest, staged: set[int]) -> dict[int, memoryview]:
    """Ask the store to lend (and check) the first uncompressed staged chunk: {index: view} if it
    lends views, else {}.  A store that lends one lends them all (it is a property of the store)."""
    plain = sorted(_plain(manifest, staged))
    if not plain:
        return {}
    view = fetcher.lend_checked(manifest.chunks[plain[0]])
    return {} if view is None else {plain[0]: view}


def _as_tensor(view: memoryview) -> torch.Tensor:
    return torch.frombuffer(view, dtype=torch.uint8) if len(view) else torch.empty(0, dtype=torch.uint8)


def stage_tensors(
    store: Storage,
    manifest: Manifest,
    destinations: dict[int, torch.Tensor],
    transfer: TransferConfig,
    *,
    only: set[int] | None = None,
    full_verify: bool = False,
    before_reading: Callable[[], None] | None = None,
) -> StagedRead:
    """Read and verify the tensors of ``manifest`` (all, or the indices in ``only``) without writing
    any tensor of ``destinations``; :meth:`StagedRead.commit` writes them.

    A destination that matches its record in dtype and shape (and is contiguous) is the tensor
    returned for its index and is filled in place on commit; every other index gets a new CPU tensor.
    Before anything is allocated or read, the chunks are HEADed (present, declared size), except
    where the read itself bounds and checks the size: an uncompressed chunk of nothing but live
    tensors' bytes (they bound it) on a store whose reads report the object's size
    (``Storage.reads_check_size``) costs no HEAD.  ``before_reading`` runs after those checks and
    before the first read (a caller's own checks, so that a damaged manifest is reported as such).
    """
    wanted = set(range(len(manifest.tensors))) if only is None else only
    unknown = sorted(i for i in wanted if not 0 <= i < len(manifest.tensors))
    if unknown:
        raise CorruptCheckpoint(f"{store.url}/{manifest.name}: the state tree refers to tensor {unknown[0]}, "
                                f"but the manifest lists {len(manifest.tensors)} tensors")
    records = {i: TensorRecord.from_json({"dtype": e.dtype, "shape": list(e.shape),
                                          "device": e.device, "nbytes": e.nbytes})
               for i, e in enumerate(manifest.tensors) if i in wanted}
    live = {i: destinations[i] for i, record in records.items() if _compatible(destinations.get(i), record)}

    pieces: dict[int, list[_Piece]] = {}
    for i in sorted(records):
        for seg in manifest.tensors[i].segments:
            pieces.setdefault(seg.chunk_index, []).append(
                _Piece(i, seg.chunk_offset, seg.tensor_offset, seg.length))
    staged = {c for c, ps in pieces.items() if any(p.tensor in live for p in ps)}  # chunks for live tensors
    unbounded = [c for c in sorted(pieces)
                 if not (store.reads_check_size and _bounded_by_live(manifest, c, pieces[c], live))]
    check_chunk_sizes(store, manifest, unbounded, transfer)
    if before_reading is not None:
        before_reading()
    tensors = {i: live[i] if i in live else empty_from_record(record, "cpu") for i, record in records.items()}
    fresh = {i: byte_view(t).numpy().data for i, t in tensors.items() if i not in live}
    pinned = wants_pinned(list(live.values()))
    fetcher = ChunkFetcher(store, transfer, full=full_verify, sizes_checked=True)
    try:
        lent = {} if pinned else _first_lent(fetcher, manifest, staged)
    except BaseException:
        fetcher.close()
        raise
    lendable = _plain(manifest, staged) if lent else set()
    two_pass = sum(manifest.chunks[c].raw_size for c in staged - lendable) > transfer.staging_budget

    stats = ReadStats(passes=2 if two_pass and staged - lendable else 1)
    pool = StagingPool(transfer.staging_budget, pinned=pinned)
    read = StagedRead(tensors, stats, live, pieces, {}, sorted(staged - lendable) if two_pass else [], fetcher, pool,
                      manifest)

    def copy_fresh(index: int, data: memoryview) -> None:
        for piece in pieces[index]:
            if piece.tensor in fresh:
                fresh[piece.tensor][piece.tensor_offset : piece.tensor_offset + piece.length] = \
                    data[piece.chunk_offset : piece.chunk_offset + piece.length]

    def read_chunk(index: int) -> None:
        ref = manifest.chunks[index]
        only_piece = pieces[index][0] if len(pieces[index]) == 1 else None
        if index in lendable:
            view = lent.pop(index) if index in lent else fetcher.lend_checked(ref)
            if view is None:
                raise RuntimeError(f"{store!r} lent a view of one chunk but not of {ref.key}")
            copy_fresh(index, view)
            with read._lock:
                read._held[index] = _as_tensor(view)
        elif index in staged:
            buffer = pool.take(ref.raw_size)
            try:
                fetcher.fetch_into(ref, _memory(buffer, ref.raw_size))
                copy_fresh(index, _memory(buffer, ref.raw_size))
            except BaseException:
                pool.give(buffer)
                raise
            if two_pass:
                pool.give(buffer)
            else:
                with read._lock:
                    read._held[index] = buffer
        elif only_piece is not None and only_piece.length == ref.raw_size:
            # A whole chunk for one new tensor: read it in place, nobody sees that tensor yet.
            start = only_piece.tensor_offset
            fetcher.fetch_into(ref, fresh[only_piece.tensor][start : start + ref.raw_size])
        else:  # only new tensors: no staging needed (the buffer is transient, as in any read)
            copy_fresh(index, fetcher.fetch(ref))
        with read._lock:
            stats.chunks_read += 1
            stats.bytes_read += ref.size

    try:
        run_parallel(read_chunk, sorted(pieces), workers=transfer.concurrency, name="cloudckpt-read")
    except BaseException:
        read.release()
        raise
    return read
