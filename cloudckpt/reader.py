"""Read one checkpoint: manifest -> parallel (ranged) chunk reads -> verify -> tensors.

Each chunk is verified (size and CRC32C, and with ``full=True`` its BLAKE3
name) before any of its bytes reach a tensor, and live tensors are written
only once the whole checkpoint has verified (:mod:`cloudckpt.staged_read`).
"""

from __future__ import annotations

import contextlib
import logging
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Iterator

import torch

from .errors import CorruptCheckpoint, NotFound
from .format.compression import decompress, decompress_into
from .format.manifest import ChunkRef, Manifest, parse_manifest
from .hashing import blake3_hex, crc32c_hex
from .parallel import run_parallel
from .storage.base import Storage
from .transfer import TransferConfig

log = logging.getLogger(__name__)


def load_manifest(store: Storage, name: str) -> Manifest:
    """Fetch and parse the manifest ``name``; NotFound if it does not exist."""
    where = f"{store.url}/{name}"
    manifest = parse_manifest(store.get(name), where)
    if manifest.name != name:
        raise CorruptCheckpoint(f"{where}: the manifest calls itself {manifest.name!r}; "
                                "a manifest must be stored under its own name")
    return manifest


@dataclass
class ReadStats:
    """What one read moved.  A restore larger than its staging budget reads its chunks twice
    (``passes`` 2); ``staging_peak`` is the most staging memory it held at once."""

    chunks_read: int = 0
    bytes_read: int = 0
    passes: int = 1
    staging_peak: int = 0


class ChunkFetcher:
    """Downloads chunks (large ones as parallel ranged GETs) and verifies them."""

    def __init__(self, store: Storage, transfer: TransferConfig, *, full: bool = False,
                 sizes_checked: bool = False) -> None:
        self.store = store
        self.transfer = transfer
        self.full = full
        self.sizes_checked = sizes_checked  # the caller HEADed every chunk (check_chunk_sizes)
        self._ranges = ThreadPoolExecutor(max_workers=transfer.concurrency, thread_name_prefix="cloudckpt-range")

    def close(self) -> None:
        self._ranges.shutdown(wait=True)

    def fetch(self, ref: ChunkRef) -> memoryview:
        """The chunk's content (decompressed), after its size and CRC32C (and BLAKE3) checked out."""
        where = f"{self.store.url}/{ref.key}"
        data: bytes | bytearray | memoryview = self._fetch_checked(ref)
        if ref.key.endswith(".zst"):
            data = decompress(data, ref.raw_size, where)
        self._check_content(ref, data)
        return memoryview(data)

    def fetch_stored(self, ref: ChunkRef) -> memoryview:
        """The chunk's bytes as stored (still compressed for ``.zst`` keys), checked like :meth:`fetch`.

        What a copy to another store must upload: the key names the stored form.
        """
        data = self._fetch_checked(ref)
        if self.full:
            self._check_content(ref, decompress(data, ref.raw_size, f"{self.store.url}/{ref.key}")
                                if ref.key.endswith(".zst") else data)
        return memoryview(data)

    def _fetch_checked(self, ref: ChunkRef) -> bytes | bytearray:
        with self._missing_is_corrupt(ref):
            data = self._download(ref)
        self.check_stored(ref, data)
        return data

    @contextlib.contextmanager
    def _missing_is_corrupt(self, ref: ChunkRef) -> Iterator[None]:
        """A chunk the manifest references but the store does not have makes the checkpoint corrupt."""
        try:
            yield
        except NotFound as exc:
            raise CorruptCheckpoint(f"{self.store.url}/{ref.key}: chunk is missing (referenced by the manifest)") \
                from exc

    def _check_content(self, ref: ChunkRef, content: bytes | bytearray | memoryview) -> None:
        """With ``full``: the content must hash to the chunk's BLAKE3 name."""
        if self.full and blake3_hex(content) != ref.hash:
            raise CorruptCheckpoint(f"{self.store.url}/{ref.key}: chunk content does not match its BLAKE3 name")

    def check_stored(self, ref: ChunkRef, data: bytes | bytearray | memoryview) -> None:
        """Check a chunk's stored bytes against the manifest: size and CRC32C."""
        where = f"{self.store.url}/{ref.key}"
        if len(data) != ref.size:
            raise CorruptCheckpoint(f"{where}: chunk has {len(data)} bytes, the manifest says {ref.size}")
        if crc32c_hex(data) != ref.crc32c:
            raise CorruptCheckpoint(f"{where}: chunk CRC32C mismatch; the stored bytes are damaged")

    def lend_checked(self, ref: ChunkRef) -> memoryview | None:
        """The store's lent view of an uncompressed chunk (see :meth:`Storage.lend`), checked like
        :meth:`fetch`; None when the store lends no views."""
        with self._missing_is_corrupt(ref):
            view = self.store.lend(ref.key)
        if view is None:
            return None
        self.check_stored(ref, view)
        self._check_content(ref, view)
        return view

    def fetch_into(self, ref: ChunkRef, dest: memoryview) -> None:
        """Read a chunk's content (``raw_size`` bytes, decompressed) into ``dest``, then verify it there.

        ``dest`` is staging memory or a tensor nobody sees yet: on a failed check it holds the
        damaged bytes.  Uncompressed chunks land straight in ``dest`` (parallel ranged reads).
        """
        where = f"{self.store.url}/{ref.key}"
        if ref.key.endswith(".zst"):
            decompress_into(self._fetch_checked(ref), dest, where)
        else:
            self._read_ranges_into(ref, dest)
            if crc32c_hex(dest) != ref.crc32c:
                raise CorruptCheckpoint(f"{where}: chunk CRC32C mismatch; the stored bytes are damaged")
        self._check_content(ref, dest)

    def _read_ranges_into(self, ref: ChunkRef, dest: memoryview) -> None:
        where = f"{self.store.url}/{ref.key}"
        step = self.transfer.range_size

        def read(start: int) -> None:
            end = min(start + step, ref.size)
            if self.store.read_into(ref.key, dest[start:end], start, size=ref.size) != end - start:
                raise CorruptCheckpoint(f"{where}: chunk is shorter than the {ref.size} bytes the manifest says")

        futures = [self._ranges.submit(read, s) for s in range(0, ref.size, step)]
        wait(futures)  # every range has stopped writing into dest before anyone reuses it
        with self._missing_is_corrupt(ref):
            for future in futures:
                future.result()

    def _download(self, ref: ChunkRef) -> bytes | bytearray:
        step = self.transfer.range_size
        if ref.size <= step:
            return self.store.get(ref.key)
        if not self.sizes_checked:  # before allocating what a (hostile) manifest declares
            stored = self.store.head(ref.key).size
            if stored != ref.size:
                raise CorruptCheckpoint(
                    f"{self.store.url}/{ref.key}: chunk has {stored} bytes, the manifest says {ref.size}")
        buffer = bytearray(ref.size)

        def fetch_range(start: int) -> None:
            end = min(start + step, ref.size)
            piece = self.store.get(ref.key, range=(start, end))
            if len(piece) != end - start:
                raise CorruptCheckpoint(
                    f"{self.store.url}/{ref.key}: chunk is shorter than the {ref.size} bytes the manifest says"
                )
            buffer[start:end] = piece

        for future in [self._ranges.submit(fetch_range, s) for s in range(0, ref.size, step)]:
            future.result()
        return buffer


def check_chunk_sizes(store: Storage, manifest: Manifest, indices: list[int], transfer: TransferConfig) -> None:
    """HEAD the chunks before anything is allocated or overwritten: a missing or wrongly sized
    chunk fails the restore while the destination tensors are still untouched."""

    def check(index: int) -> None:
        ref = manifest.chunks[index]
        where = f"{store.url}/{ref.key}"
        try:
            size = store.head(ref.key).size
        except NotFound as exc:
            raise CorruptCheckpoint(f"{where}: chunk is missing (referenced by {manifest.name})") from exc
        if size != ref.size:
            raise CorruptCheckpoint(f"{where}: chunk has {size} bytes, {manifest.name} says {ref.size}")

    run_parallel(check, indices, workers=transfer.concurrency, name="cloudckpt-head")


def read_tensors(
    store: Storage,
    manifest: Manifest,
    destinations: dict[int, torch.Tensor],
    transfer: TransferConfig,
    *,
    only: set[int] | None = None,
    full_verify: bool = False,
) -> tuple[dict[int, torch.Tensor], ReadStats]:
    """Read the tensors of ``manifest`` (all, or the indices in ``only``); index -> tensor.

    A tensor whose index is in ``destinations`` and matches in dtype and shape is
    filled in place, but only once every chunk has verified (see
    :func:`cloudckpt.staged_read.stage_tensors`); the others are new CPU tensors.
    """
    from .staged_read import stage_tensors

    staged = stage_tensors(store, manifest, destinations, transfer, only=only, full_verify=full_verify)
    staged.commit()
    return staged.tensors, staged.stats


def verify_chunks(store: Storage, manifest: Manifest, transfer: TransferConfig) -> ReadStats:
    """Re-read every chunk of ``manifest`` and check size, CRC32C and BLAKE3; raise on the first failure."""
    fetcher = ChunkFetcher(store, transfer, full=True)
    try:
        sizes = run_parallel(lambda ref: len(fetcher.fetch(ref)), manifest.chunks, workers=transfer.concurrency,
                             name="cloudckpt-verify")
    finally:
        fetcher.close()
    return ReadStats(chunks_read=len(sizes), bytes_read=sum(sizes))
