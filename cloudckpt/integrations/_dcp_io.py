"""The data path under DCP: planned write items -> content-addressed chunks, and read items <- chunks.

Shared by :mod:`cloudckpt.integrations.dcp` (DCP's StorageWriter/StorageReader)
and :mod:`cloudckpt.distributed` (the manager, which drives DCP's planners
itself).  Neither knows how the item locations are committed; this module only
moves bytes and says where they are (:class:`ItemLocation`).
"""

from __future__ import annotations

import io
import logging
import threading
from collections.abc import Callable, Mapping
from concurrent.futures import Future as _PyFuture
from concurrent.futures import ThreadPoolExecutor

import torch
from torch.distributed.checkpoint.metadata import MetadataIndex
from torch.distributed.checkpoint.planner import (
    LoadItemType,
    LoadPlanner,
    ReadItem,
    SavePlanner,
    WriteItem,
    WriteItemType,
)

from ..errors import CorruptCheckpoint, NotFound
from ..format.dtypes import TENSOR_DTYPES, TensorRecord, empty_from_record, tensor_bytes
from ..format.manifest import ChunkRef
from ..format.serialize import Segment, UnsupportedValue
from ..reader import ChunkFetcher
from ..storage import Storage
from ..transfer import TransferConfig
from ..writer import WriteStats, host_copy, upload_tensors
from ._dcp_metadata import ItemLocation

log = logging.getLogger(__name__)

#: Called with (fqn, payload) before a BYTE_IO payload reaches the planner; raises to refuse it.
BytesCheck = Callable[[str, bytes], None]


def store_items(store: Storage, items: list[WriteItem], planner: SavePlanner, transfer: TransferConfig,
                known_chunks: Mapping[str, ChunkRef] | None = None) -> tuple[list[ItemLocation], WriteStats]:
    """Resolve each planned item through ``planner`` and upload it; return where each one's bytes are."""
    tensors: list[torch.Tensor] = []
    for item in items:
        data = planner.resolve_data(item)
        if item.type == WriteItemType.BYTE_IO:
            if not isinstance(data, io.BytesIO):
                raise TypeError(f"{item.index.fqn}: the planner resolved a BYTE_IO item to {type(data).__name__}")
            payload = bytearray(data.getbuffer())
            tensor = torch.frombuffer(payload, dtype=torch.uint8) if payload else torch.empty(0, dtype=torch.uint8)
        else:
            if not isinstance(data, torch.Tensor):
                raise TypeError(f"{item.index.fqn}: the planner resolved a tensor item to {type(data).__name__}")
            if data.dtype not in TENSOR_DTYPES.values() or data.layout != torch.strided:
                raise UnsupportedValue(f"{item.index.fqn}: a {data.dtype} {data.layout} tensor cannot be stored "
                                       "as raw bytes")
            tensor = host_copy(data)
            expected = tuple(item.tensor_data.chunk.sizes) if item.tensor_data else tuple(tensor.shape)
            if tuple(tensor.shape) != expected:
                raise ValueError(f"{item.index.fqn}: resolved shard has shape {tuple(tensor.shape)}, "
                                 f"the plan says {expected}")
        tensors.append(tensor)
    uploaded = upload_tensors(store, tensors, transfer, dict(known_chunks or {}))
    locations = []
    for item, entry in zip(items, uploaded.tensors):
        used: dict[int, int] = {}
        segments = []
        for s in entry.segments:
            local = used.setdefault(s.chunk_index, len(used))
            segments.append(Segment(local, s.chunk_offset, s.tensor_offset, s.length))
        locations.append(ItemLocation(
            kind="bytes" if item.type == WriteItemType.BYTE_IO else "tensor",
            dtype=entry.dtype, shape=tuple(entry.shape), nbytes=entry.nbytes,
            chunks=tuple(uploaded.chunks[c] for c in used), segments=tuple(segments),
        ))
    return locations, uploaded.stats


class ItemReader:
    """Serves DCP read items from stored item locations: HEAD-checks every chunk first, fetches each once,
    verifies it (size, CRC32C; BLAKE3 with ``full_verify``) and copies the requested blocks into the planner's
    destinations."""

    def __init__(self, store: Storage, transfer: TransferConfig, *, full_verify: bool = False,
                 bytes_check: BytesCheck | None = None) -> None:
        self.store = store
        self.transfer = transfer
        self.full_verify = full_verify
        self.bytes_check = bytes_check

    def read(self, requests: list[ReadItem], storage_data: Mapping[MetadataIndex, ItemLocation],
             planner: LoadPlanner, where: str) -> None:
        by_item: dict[MetadataIndex, list[ReadItem]] = {}
        for request in requests:
            by_item.setdefault(request.storage_index, []).append(request)
        missing = sorted({index.fqn for index in by_item if index not in storage_data})
        if missing:
            raise CorruptCheckpoint(f"{where}: the plan reads {missing[:5]}, which the metadata stores nowhere")
        locations = {index: storage_data[index] for index in by_item}
        uses: dict[str, int] = {}
        refs: dict[str, ChunkRef] = {}
        for location in locations.values():
            for key in {location.chunks[s.chunk_index].key for s in location.segments}:
                uses[key] = uses.get(key, 0) + 1
            refs.update((location.chunks[s.chunk_index].key, location.chunks[s.chunk_index])
                        for s in location.segments)
        self._check_sizes(list(refs.values()), where)
        fetcher = ChunkFetcher(self.store, self.transfer, full=self.full_verify)
        cache = _ChunkCache(fetcher, uses)
        planner_lock = threading.Lock()

        def load(index: MetadataIndex) -> None:
            location = locations[index]
            stored = _assemble(location, cache)
            with planner_lock:
                for request in by_item[index]:
                    self._deliver(request, location, stored, planner)

        try:
            with ThreadPoolExecutor(max_workers=self.transfer.concurrency, thread_name_prefix="cloudckpt-dcp") as pool:
                futures = [pool.submit(load, index) for index in locations]
                try:
                    for f in futures:
                        f.result()
                except BaseException:
                    for f in futures:
                        f.cancel()
                    raise
        finally:
            fetcher.close()

    def _check_sizes(self, refs: list[ChunkRef], where: str) -> None:
        def check(ref: ChunkRef) -> None:
            at = f"{self.store.url}/{ref.key}"
            try:
                size = self.store.head(ref.key).size
            except NotFound as exc:
                raise CorruptCheckpoint(f"{at}: chunk is missing (referenced by {where})") from exc
            if size != ref.size:
                raise CorruptCheckpoint(f"{at}: chunk has {size} bytes, {where} says {ref.size}")

        with ThreadPoolExecutor(max_workers=self.transfer.concurrency, thread_name_prefix="cloudckpt-head") as pool:
            list(pool.map(check, refs))

    def _deliver(self, request: ReadItem, location: ItemLocation, stored: torch.Tensor, planner: LoadPlanner) -> None:
        fqn = request.dest_index.fqn
        if request.type == LoadItemType.BYTE_IO:
            if location.kind != "bytes":
                raise CorruptCheckpoint(f"{self.store.url}: {fqn!r} is a tensor in the checkpoint, not bytes")
            payload = tensor_bytes(stored).tobytes()
            if self.bytes_check is not None:
                self.bytes_check(fqn, payload)
            planner.load_bytes(request, io.BytesIO(payload))
            return
        if location.kind != "tensor":
            raise CorruptCheckpoint(f"{self.store.url}: {fqn!r} is stored as bytes, the plan reads a tensor")
        source = stored
        if len(request.storage_offsets) != source.dim() or len(request.lengths) != source.dim():
            raise CorruptCheckpoint(f"{self.store.url}: {fqn!r}: the read covers {len(request.lengths)} "
                                    f"dimensions of a {source.dim()}-dimensional shard")
        for dim, (offset, length) in enumerate(zip(request.storage_offsets, request.lengths)):
            source = source.narrow(dim, offset, length)
        target = planner.resolve_tensor(request).detach()
        if target.size() != source.size():
            raise CorruptCheckpoint(f"{self.store.url}: {fqn!r}: the checkpoint gives a {tuple(source.shape)} "
                                    f"block for a {tuple(target.shape)} destination")
        target.copy_(source)
        planner.commit_tensor(request, target)


def _assemble(location: ItemLocation, cache: _ChunkCache) -> torch.Tensor:
    tensor = empty_from_record(TensorRecord(location.dtype, list(location.shape), "cpu", location.nbytes))
    view = tensor_bytes(tensor)
    by_chunk: dict[str, list[Segment]] = {}
    for s in location.segments:
        by_chunk.setdefault(location.chunks[s.chunk_index].key, []).append(s)
    for segments in by_chunk.values():
        ref = location.chunks[segments[0].chunk_index]
        data = cache.get(ref)
        try:
            for s in segments:
                view[s.tensor_offset: s.tensor_offset + s.length] = data[s.chunk_offset: s.chunk_offset + s.length]
        finally:
            cache.release(ref)
    return tensor


class _ChunkCache:
    """Fetch each chunk once while items that share it (packed small items) are assembled."""

    def __init__(self, fetcher: ChunkFetcher, uses: dict[str, int]) -> None:
        self._fetcher = fetcher
        self._uses = dict(uses)
        self._futures: dict[str, _PyFuture] = {}
        self._lock = threading.Lock()

    def get(self, ref: ChunkRef) -> memoryview:
        with self._lock:
            future = self._futures.get(ref.key)
            owner = future is None
            if owner:
                future = self._futures[ref.key] = _PyFuture()
        if owner:
            try:
                future.set_result(self._fetcher.fetch(ref))
            except BaseException as exc:  # noqa: BLE001
                future.set_exception(exc)
        return future.result()

    def release(self, ref: ChunkRef) -> None:
        with self._lock:
            self._uses[ref.key] -= 1
            if self._uses[ref.key] <= 0:
                self._futures.pop(ref.key, None)
