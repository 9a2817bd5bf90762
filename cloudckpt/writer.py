"""Write one checkpoint: host tensors -> chunks -> parallel upload -> manifest commit.

The commit is the create-only write of the manifest.  Until it succeeds the
checkpoint does not exist; if anything before it fails, the chunks already
uploaded are unreferenced garbage that the sweeper removes after its grace
period, and every earlier checkpoint is untouched.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from typing import Any

import torch

from . import single_writer
from .errors import AlreadyExists, CorruptCheckpoint, LostRace
from .format.dtypes import record_of, tensor_bytes
from .format.manifest import ChunkRef, Manifest, TensorEntry, chunk_key
from .format.compression import compress
from .format.serialize import ChunkPlan, plan_chunks
from .hashing import blake3_hex, crc32c, crc32c_combine, crc32c_hex
from .parallel import run_parallel
from .storage.base import ObjectInfo, Storage, part_size_for, put_object, upload_multipart
from .transfer import TransferConfig

log = logging.getLogger(__name__)


@dataclass
class WriteStats:
    """What one save cost: chunks and bytes uploaded versus reused from earlier checkpoints."""

    chunks_uploaded: int = 0
    chunks_reused: int = 0
    bytes_uploaded: int = 0
    bytes_reused: int = 0


def host_copy(tensor: torch.Tensor) -> torch.Tensor:
    """A CPU, contiguous tensor with ``tensor``'s values (``tensor`` itself when it already is one)."""
    tensor = tensor.detach()
    if tensor.device.type != "cpu":
        tensor = tensor.to("cpu")
    return tensor.contiguous()


def _chunk_bytes(plan: ChunkPlan, index: int, views: list[memoryview]) -> memoryview:
    slices = plan.chunks[index]
    if len(slices) == 1:
        s = slices[0]
        return views[s.tensor_index][s.tensor_offset : s.tensor_offset + s.length]
    buffer = bytearray(sum(s.length for s in slices))
    for s in slices:
        buffer[s.chunk_offset : s.chunk_offset + s.length] = views[s.tensor_index][
            s.tensor_offset : s.tensor_offset + s.length
        ]
    return memoryview(buffer)


class ChunkUploader:
    """Hashes chunks and uploads those the store does not already hold for a live checkpoint."""

    def __init__(self, store: Storage, transfer: TransferConfig, known: dict[str, ChunkRef]) -> None:
        self.store = store
        self.transfer = transfer
        self.known = known
        self.stats = WriteStats()
        self._in_this_save: dict[str, ChunkRef] = {}
        self._lock = threading.Lock()

    def upload(self, raw: memoryview) -> ChunkRef:
        content_hash = blake3_hex(raw)
        key = chunk_key(content_hash, self.transfer.compression)
        with self._lock:
            reused = self.known.get(key) or self._in_this_save.get(key)
            if reused is not None:
                self.stats.chunks_reused += 1
                self.stats.bytes_reused += reused.size
                return reused
        stored = raw if self.transfer.compression == "none" else memoryview(
            compress(raw, self.transfer.compression_level))
        crc, part_crcs = self._checksums(stored)
        ref = ChunkRef(key, content_hash, len(stored), f"{crc:08x}", len(raw))
        self._put(ref, stored, part_crcs)
        with self._lock:
            self._in_this_save[key] = ref
            self.stats.chunks_uploaded += 1
            self.stats.bytes_uploaded += ref.size
        return ref

    def _checksums(self, data: memoryview) -> tuple[int, list[int] | None]:
        """The CRC32C of ``data`` and, when it goes in parts, of each part, reading every byte once:
        the store checks the parts' CRCs, and the chunk's (in the manifest) is combined from them."""
        if len(data) <= self.transfer.multipart_threshold:
            return crc32c(data), None
        size = part_size_for(self.store, self.transfer.part_size)
        parts = [crc32c(data[start:start + size]) for start in range(0, len(data), size)]
        whole = parts[0]
        for start, crc in zip(range(size, len(data), size), parts[1:]):
            whole = crc32c_combine(whole, crc, min(size, len(data) - start))
        return whole, parts

    def _put(self, ref: ChunkRef, data: memoryview, part_crcs: list[int] | None) -> None:
        if part_crcs is not None:
            info = upload_multipart(
                self.store, ref.key, data,
                part_size=self.transfer.part_size, concurrency=max(2, self.transfer.concurrency // 4),
                part_crc32c=[f"{crc:08x}" for crc in part_crcs],
            )
        else:
            info = put_object(self.store, ref.key, data, crc32c=ref.crc32c)
        where = f"{self.store.url}/{ref.key}"
        if info.size != ref.size or (info.crc32c is not None and info.crc32c != ref.crc32c):
            raise CorruptCheckpoint(
                f"{where}: the store reports {info.size} bytes crc32c {info.crc32c} after upload, "
                f"but {ref.size} bytes crc32c {ref.crc32c} were sent"
            )
        if self.transfer.verify == "read-back":
            stored = self.store.get(ref.key)
            if len(stored) != ref.size or crc32c_hex(stored) != ref.crc32c:
                raise CorruptCheckpoint(f"{where}: read-back after upload does not match what was sent")


@dataclass
class Uploaded:
    """Tensors stored as chunks, not yet referenced by any manifest."""

    tensors: list[TensorEntry]
    chunks: list[ChunkRef]
    stats: WriteStats


def upload_tensors(
    store: Storage,
    tensors: list[torch.Tensor],
    transfer: TransferConfig,
    known_chunks: dict[str, ChunkRef],
    devices: list[str] | None = None,
) -> Uploaded:
    """Cut host tensors (CPU, contiguous) into chunks and upload, in parallel, those not in ``known_chunks``.

    ``known_chunks`` are chunks referenced by live checkpoints of this root;
    ``devices`` records where each tensor lived before it was copied to host memory.
    """
    records = [record_of(t) for t in tensors]
    for tensor in tensors:
        if tensor.device.type != "cpu" or not tensor.is_contiguous():
            raise ValueError(f"upload_tensors needs contiguous host tensors; got one on {tensor.device}")
    plan = plan_chunks(records, chunk_size=transfer.chunk_size, pack_threshold=transfer.pack_threshold,
                       pack_size=transfer.pack_size)
    views = [tensor_bytes(t) for t in tensors]
    uploader = ChunkUploader(store, transfer, known_chunks)
    chunks = run_parallel(lambda i: uploader.upload(_chunk_bytes(plan, i, views)), range(len(plan.chunks)),
                          workers=transfer.concurrency, name="cloudckpt-upload")
    entries = [
        TensorEntry(dtype=record.dtype, shape=tuple(record.shape),
                    device=devices[i] if devices else record.device,
                    nbytes=record.nbytes, segments=tuple(plan.segments[i]))
        for i, record in enumerate(records)
    ]
    return Uploaded(entries, chunks, uploader.stats)


def commit_manifest(store: Storage, manifest: Manifest) -> ObjectInfo:
    """Write ``manifest`` create-only: from this moment the checkpoint exists.

    A name already taken is AlreadyExists; :func:`cloudckpt.branching.commit` settles why (a
    superseded or damaged manifest, or the same checkpoint saved again).  On a store that ignores
    create-only writes (single-writer mode) the name is checked first and the write read back.
    """
    data = manifest.to_bytes()
    try:
        single_writer.refuse_if_taken(store, manifest.name)
        info = store.put(manifest.name, data, mode="create")
    except AlreadyExists as exc:
        raise AlreadyExists(
            f"{store.url}/{manifest.name}: a checkpoint of that name is already committed; "
            "it was kept as it is. Save under another name or step."
        ) from exc
    if not single_writer.confirmed(store, manifest.name, data, "This save is lost; the other checkpoint stands."):
        raise LostRace(
            f"{store.url}/{manifest.name}: another writer committed a checkpoint of that name at the same "
            "moment and replaced this one (the store ignores create-only writes). Only one process may "
            "write to this root."
        )
    return info


def write_checkpoint(
    store: Storage,
    *,
    name: str,
    tree: Any,
    tensors: list[torch.Tensor],
    metadata: dict[str, Any],
    transfer: TransferConfig,
    known_chunks: dict[str, ChunkRef],
    devices: list[str] | None = None,
) -> tuple[Manifest, WriteStats]:
    """Upload ``tensors`` (CPU, contiguous) as chunks, then commit the manifest named ``name``.

    Raises AlreadyExists if ``name`` is taken (and leaves that checkpoint as it is).
    """
    uploaded = upload_tensors(store, tensors, transfer, known_chunks, devices)
    manifest = Manifest(name=name, tensors=uploaded.tensors, chunks=uploaded.chunks,
                        compression=transfer.compression, state=tree, **metadata)
    commit_manifest(store, manifest)
    stats = uploaded.stats
    log.info(
        "committed %s/%s: %d chunks uploaded (%.1f MiB), %d reused (%.1f MiB)",
        store.url, name, stats.chunks_uploaded, stats.bytes_uploaded / 2**20,
        stats.chunks_reused, stats.bytes_reused / 2**20,
    )
    return manifest, stats
