"""Read one checkpoint: manifest -> parallel (ranged) chunk reads -> verify -> tensors.

Each chunk is verified (size and CRC32C, and with ``full=True`` its BLAKE3
name) before any of its bytes reach a tensor.  Bytes are written straight
into destination tensors where the caller supplies them, so restoring a
model does not hold a second full copy of it in memory.
"""

from __future__ import annotations

import logging
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch

from .errors import CorruptCheckpoint, NotFound
from .format.compression import decompress
from .format.dtypes import TensorRecord, empty_from_record, tensor_bytes
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
    chunks_read: int = 0
    bytes_read: int = 0


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
        where = f"{self.store.url}/{ref.key}"
        try:
            data = self._download(ref)
        except NotFound as exc:
            raise CorruptCheckpoint(f"{where}: chunk is missing (referenced by the manifest)") from exc
        if len(data) != ref.size:
            raise CorruptCheckpoint(f"{where}: chunk has {len(data)} bytes, the manifest says {ref.size}")
        if crc32c_hex(data) != ref.crc32c:
            raise CorruptCheckpoint(f"{where}: chunk CRC32C mismatch; the stored bytes are damaged")
        if ref.key.endswith(".zst"):
            data = decompress(data, ref.raw_size, where)
        if self.full and blake3_hex(data) != ref.hash:
            raise CorruptCheckpoint(f"{where}: chunk content does not match its BLAKE3 name")
        return memoryview(data)

    def fetch_into(self, ref: ChunkRef, dest: memoryview) -> None:
        """Read an uncompressed chunk straight into ``dest`` (exactly its size), then verify it there.

        Saves a copy when a chunk holds one tensor's bytes; on a failed check ``dest`` holds the
        damaged bytes and the error says so.
        """
        where = f"{self.store.url}/{ref.key}"
        step = self.transfer.range_size

        def read(start: int) -> None:
            end = min(start + step, ref.size)
            if self.store.read_into(ref.key, dest[start:end], start) != end - start:
                raise CorruptCheckpoint(f"{where}: chunk is shorter than the {ref.size} bytes the manifest says")

        try:
            for future in [self._ranges.submit(read, s) for s in range(0, ref.size, step)]:
                future.result()
        except NotFound as exc:
            raise CorruptCheckpoint(f"{where}: chunk is missing (referenced by the manifest)") from exc
        if crc32c_hex(dest) != ref.crc32c:
            raise CorruptCheckpoint(f"{where}: chunk CRC32C mismatch; the stored bytes are damaged")
        if self.full and blake3_hex(dest) != ref.hash:
            raise CorruptCheckpoint(f"{where}: chunk content does not match its BLAKE3 name")

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


def _compatible(dest: torch.Tensor | None, record: TensorRecord) -> bool:
    return (
        dest is not None
        and dest.dtype == record.torch_dtype
        and list(dest.shape) == list(record.shape)
        and dest.is_contiguous()
        and not dest.requires_grad
    )


def read_tensors(
    store: Storage,
    manifest: Manifest,
    destinations: dict[int, torch.Tensor],
    transfer: TransferConfig,
    *,
    only: set[int] | None = None,
    full_verify: bool = False,
) -> tuple[dict[int, torch.Tensor], ReadStats]:
    """Read the tensors of ``manifest`` (all, or the indices in ``only``).

    A tensor whose index is in ``destinations`` and matches in dtype and shape
    is filled in place (via a host staging copy when it is not on the CPU);
    the others are new CPU tensors.  Returns index -> tensor.
    """
    wanted = set(range(len(manifest.tensors))) if only is None else only
    unknown = sorted(i for i in wanted if not 0 <= i < len(manifest.tensors))
    if unknown:
        raise CorruptCheckpoint(f"{store.url}/{manifest.name}: the state tree refers to tensor {unknown[0]}, "
                                f"but the manifest lists {len(manifest.tensors)} tensors")
    needed = sorted({seg.chunk_index for i in wanted for seg in manifest.tensors[i].segments})
    check_chunk_sizes(store, manifest, needed, transfer)
    records = {i: TensorRecord.from_json({"dtype": e.dtype, "shape": list(e.shape),
                                          "device": e.device, "nbytes": e.nbytes})
               for i, e in enumerate(manifest.tensors) if i in wanted}
    results: dict[int, torch.Tensor] = {}
    hosts: dict[int, torch.Tensor] = {}
    for i, record in records.items():
        dest = destinations.get(i)
        if _compatible(dest, record):
            results[i] = dest
            hosts[i] = dest if dest.device.type == "cpu" else empty_from_record(record, "cpu")
        else:
            hosts[i] = results[i] = empty_from_record(record, "cpu")
    views = {i: tensor_bytes(t) for i, t in hosts.items()}

    by_chunk: dict[int, list[tuple[int, int, int, int]]] = {}
    for i in records:
        for seg in manifest.tensors[i].segments:
            by_chunk.setdefault(seg.chunk_index, []).append((i, seg.chunk_offset, seg.tensor_offset, seg.length))

    fetcher = ChunkFetcher(store, transfer, full=full_verify, sizes_checked=True)
    stats = ReadStats()
    lock = threading.Lock()

    def read_chunk(index: int) -> None:
        ref, pieces = manifest.chunks[index], by_chunk[index]
        if len(pieces) == 1 and pieces[0][1] == 0 and pieces[0][3] == ref.size == ref.raw_size:
            tensor_index, _, tensor_offset, length = pieces[0]  # one tensor's bytes: read in place
            fetcher.fetch_into(ref, views[tensor_index][tensor_offset : tensor_offset + length])
            data_length = length
        else:
            data = fetcher.fetch(ref)
            for tensor_index, chunk_offset, tensor_offset, length in pieces:
                views[tensor_index][tensor_offset : tensor_offset + length] = data[chunk_offset : chunk_offset + length]
            data_length = len(data)
        with lock:
            stats.chunks_read += 1
            stats.bytes_read += data_length

    try:
        run_parallel(read_chunk, sorted(by_chunk), workers=transfer.concurrency, name="cloudckpt-read")
    finally:
        fetcher.close()
    for i, host in hosts.items():
        if results[i] is not host:
            results[i].copy_(host)
    return results, stats


def verify_chunks(store: Storage, manifest: Manifest, transfer: TransferConfig) -> ReadStats:
    """Re-read every chunk of ``manifest`` and check size, CRC32C and BLAKE3; raise on the first failure."""
    fetcher = ChunkFetcher(store, transfer, full=True)
    try:
        sizes = run_parallel(lambda ref: len(fetcher.fetch(ref)), manifest.chunks, workers=transfer.concurrency,
                             name="cloudckpt-verify")
    finally:
        fetcher.close()
    return ReadStats(chunks_read=len(sizes), bytes_read=sum(sizes))
