"""``torch.distributed.checkpoint`` (DCP) storage over cloudckpt: S3, GCS, local, memory.

    import torch.distributed.checkpoint as dcp
    from cloudckpt.integrations.dcp import CloudStorageReader, CloudStorageWriter

    dcp.save(state_dict, storage_writer=CloudStorageWriter("s3://bucket/run/step-100"))
    dcp.load(state_dict, storage_reader=CloudStorageReader("s3://bucket/run/step-100"))
    dcp.async_save(state_dict, storage_writer=CloudStorageWriter(...)).result()

Layout under the checkpoint's location::

    chunks/ab/ab12…ef     content-addressed data (BLAKE3 name, CRC32C checked both ways)
    .metadata.json        DCP's Metadata as JSON: the commit record, written create-only, last

Every rank uploads the data items DCP plans for it (tensor shards as raw bytes,
small items packed together, large ones cut into chunks; the same machinery as
cloudckpt's own checkpoints).  DCP gathers every rank's write results to the
coordinator; only if *all* ranks succeeded does it call :meth:`CloudStorageWriter.finish`,
which writes ``.metadata.json`` with a create-only put.  A rank that fails, or a
coordinator that dies before the put, leaves no metadata object, so the
checkpoint does not exist (its chunks are unreferenced garbage); a committed
checkpoint is never overwritten (a second save to the same location fails).

Chunks are content-addressed rather than per-rank files (``__1_0.distcp``):
every object is immutable and named by its hash, so ranks never collide, a
retry of a failed save rewrites identical data under the same keys instead of
leaving a second copy, and identical data is stored once.  Chunks a failed save
left behind are not swept by cloudckpt's sweeper (it knows manifests, not DCP
metadata): delete the checkpoint's prefix to remove them.

One writer (or reader) handles one checkpoint operation at a time, like torch's
``FileSystemWriter``: wait for an ``async_save`` before starting the next one
with the same writer.

Pickle.  The metadata is plain JSON; tensors are raw bytes.  But DCP itself
stores every non-tensor value of a state dict (an ``int`` step, a string, a
dict of Python objects) as a ``BytesIO`` item made by ``torch.save`` — a pickle
— and its ``DefaultLoadPlanner.load_bytes`` reads it back with
``torch.load(weights_only=False)``: arbitrary code.  So :class:`CloudStorageReader`
refuses to load such items unless ``allow_pickle`` is given: ``"weights_only"``
first unpickles each payload with torch's restricted unpickler (only tensors
and plain containers/scalars pass), ``True`` trusts it entirely.  Loading only
the tensor entries (leave the others out of the state dict you load into) needs
neither.
"""

from __future__ import annotations

import io
import logging
import os
import threading
import uuid
from collections.abc import Mapping
from concurrent.futures import Future as _PyFuture
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Literal, TypeVar

import torch
from torch.distributed.checkpoint.metadata import Metadata, MetadataIndex, StorageMeta
from torch.distributed.checkpoint.planner import (
    LoadItemType,
    LoadPlan,
    LoadPlanner,
    ReadItem,
    SavePlan,
    SavePlanner,
    WriteItem,
    WriteItemType,
)
from torch.distributed.checkpoint.storage import (
    StorageReader,
    StorageWriter,
    WriteResult,
)
from torch.futures import Future

from .. import __version__
from ..errors import AlreadyExists, CorruptCheckpoint, NotFound
from ..format.dtypes import (
    TENSOR_DTYPES,
    TensorRecord,
    empty_from_record,
    tensor_bytes,
)
from ..format.manifest import ChunkRef
from ..format.serialize import PickleNotAllowed, Segment, UnsupportedValue
from ..reader import ChunkFetcher
from ..storage import Storage, open_storage
from ..transfer import TransferConfig
from ..writer import host_copy, upload_tensors
from ._dcp_metadata import (
    DCP_VERSION,
    METADATA_KEY,
    ItemLocation,
    decode_metadata,
    encode_metadata,
)

__all__ = ["METADATA_KEY", "CloudStorageReader", "CloudStorageWriter", "PickleNotAllowed"]

log = logging.getLogger(__name__)

_SCHEMES = ("s3://", "gs://", "gcs://", "file://", "memory://")


class _Location:
    """The store a checkpoint lives in: a URL this object opened (and closes), or a caller's Storage."""

    def __init__(self, root_or_store: str | os.PathLike[str] | Storage,
                 storage_options: Mapping[str, Any] | None) -> None:
        self.options = dict(storage_options or {})
        self.given: Storage | None = None
        self.owned: Storage | None = None
        if isinstance(root_or_store, Storage):
            if self.options:
                raise TypeError("storage_options apply only when the checkpoint is given as a URL or path")
            self.given = root_or_store
        else:
            self.owned = open_storage(root_or_store, **self.options)

    @property
    def store(self) -> Storage:
        store = self.given or self.owned
        assert store is not None
        return store

    def reset(self, checkpoint_id: str | os.PathLike[str] | None) -> None:
        if checkpoint_id is None or (self.owned is not None and str(checkpoint_id) == self.owned.url):
            return
        if self.given is not None:
            raise ValueError(
                f"this DCP storage object was built on {self.given!r}, a Storage object, so it cannot move to "
                f"checkpoint_id={str(checkpoint_id)!r}; build one per checkpoint, or build it from a URL")
        new = open_storage(checkpoint_id, **self.options)
        if self.owned is not None:
            self.owned.close()
        self.owned = new

    def close(self) -> None:
        if self.owned is not None:
            self.owned.close()
            self.owned = None


def _validate_checkpoint_id(checkpoint_id: str | os.PathLike[str]) -> bool:
    return str(checkpoint_id).startswith(_SCHEMES)


_L = TypeVar("_L", bound="_AtLocation")


class _AtLocation:
    """What the writer and the reader share: the store of one checkpoint location."""

    _location: _Location

    @property
    def store(self) -> Storage:
        return self._location.store

    @property
    def checkpoint_id(self) -> str:
        """The URL of the checkpoint."""
        return self.store.url

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: str | os.PathLike[str]) -> bool:
        return _validate_checkpoint_id(checkpoint_id)

    def close(self) -> None:
        self._location.close()

    def __enter__(self: _L) -> _L:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class CloudStorageWriter(_AtLocation, StorageWriter):
    """A DCP StorageWriter that stores a checkpoint under a cloudckpt location (``s3://``, ``gs://``, a path ...).

    ``root_or_store`` is the checkpoint's own location (one per checkpoint), or a
    :class:`~cloudckpt.storage.Storage` whose root is that location.  A
    ``checkpoint_id`` passed to ``dcp.save`` replaces a URL location.
    ``storage_options`` go to :func:`~cloudckpt.storage.open_storage` (e.g.
    ``endpoint_url``); ``transfer`` sets chunk sizes, parallelism, compression
    and verification (:class:`~cloudckpt.transfer.TransferConfig`).

    Every rank builds its own writer on the same location.  Close it (or use it
    as a context manager) to release the connections it opened.
    """

    def __init__(
        self,
        root_or_store: str | os.PathLike[str] | Storage,
        *,
        storage_options: Mapping[str, Any] | None = None,
        transfer: TransferConfig | None = None,
    ) -> None:
        super().__init__()
        self._location = _Location(root_or_store, storage_options)
        self.transfer = transfer or TransferConfig()
        self.save_id = str(uuid.uuid4())
        self.is_coordinator = False
        self.rank: int | None = None

    def reset(self, checkpoint_id: str | os.PathLike[str] | None = None) -> None:
        self._location.reset(checkpoint_id)
        self.save_id = str(uuid.uuid4())

    def set_up_storage_writer(self, is_coordinator: bool, *args: Any, **kwargs: Any) -> None:
        self.is_coordinator = is_coordinator
        self.rank = kwargs.get("rank")
        if not kwargs.get("use_collectives", True):
            raise ValueError(
                "CloudStorageWriter needs use_collectives=True: a checkpoint is committed once, by the "
                "coordinator, after every rank's data is stored; without collectives nobody knows that")

    def storage_meta(self) -> StorageMeta | None:
        return StorageMeta(checkpoint_id=self.checkpoint_id, save_id=self.save_id)

    def prepare_local_plan(self, plan: SavePlan) -> SavePlan:
        if self.is_coordinator:
            try:
                self.store.head(METADATA_KEY)
            except NotFound:
                pass
            else:
                raise AlreadyExists(self._exists_message())
        return plan

    def prepare_global_plan(self, plans: list[SavePlan]) -> list[SavePlan]:
        return plans

    def write_data(self, plan: SavePlan, planner: SavePlanner) -> Future[list[WriteResult]]:
        future: Future[list[WriteResult]] = Future()
        future.set_result(self._write(plan.items, planner))
        return future

    def _write(self, items: list[WriteItem], planner: SavePlanner) -> list[WriteResult]:
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
        uploaded = upload_tensors(self.store, tensors, self.transfer, {})
        results = []
        for item, entry in zip(items, uploaded.tensors):
            used: dict[int, int] = {}
            segments = []
            for s in entry.segments:
                local = used.setdefault(s.chunk_index, len(used))
                segments.append(Segment(local, s.chunk_offset, s.tensor_offset, s.length))
            location = ItemLocation(
                kind="bytes" if item.type == WriteItemType.BYTE_IO else "tensor",
                dtype=entry.dtype, shape=tuple(entry.shape), nbytes=entry.nbytes,
                chunks=tuple(uploaded.chunks[c] for c in used), segments=tuple(segments),
            )
            results.append(WriteResult(index=item.index, size_in_bytes=entry.nbytes, storage_data=location))
        stats = uploaded.stats
        log.info("rank %s: %d DCP items in %d chunks to %s (%.1f MiB uploaded)", self.rank, len(items),
                 stats.chunks_uploaded + stats.chunks_reused, self.store.url, stats.bytes_uploaded / 2**20)
        return results

    def finish(self, metadata: Metadata, results: list[list[WriteResult]]) -> None:
        """Commit: write the metadata object create-only.  DCP calls this on the coordinator only,
        and only once every rank's ``write_data`` succeeded."""
        metadata.version = DCP_VERSION
        metadata.storage_data = {r.index: r.storage_data for rank_results in results for r in rank_results}
        metadata.storage_meta = self.storage_meta()
        body = encode_metadata(metadata, compression=self.transfer.compression, library_version=__version__)
        try:
            self.store.put(METADATA_KEY, body, mode="create")
        except AlreadyExists as exc:
            raise AlreadyExists(self._exists_message()) from exc
        log.info("committed DCP checkpoint %s/%s (%d items)", self.store.url, METADATA_KEY, len(metadata.storage_data))

    def _exists_message(self) -> str:
        return (f"{self.store.url}/{METADATA_KEY}: a DCP checkpoint is already committed there; it was kept "
                "as it is. Save to another location (checkpoint_id), or delete that one first")



class CloudStorageReader(_AtLocation, StorageReader):
    """A DCP StorageReader for checkpoints written by :class:`CloudStorageWriter`.

    Every chunk is checked (size, CRC32C; and its BLAKE3 name with
    ``full_verify=True``) before its bytes reach a tensor; the chunks a rank
    needs are HEAD-checked before any destination tensor is written.
    ``allow_pickle``: ``False`` (default) refuses to load DCP's pickled
    non-tensor items (raises :class:`PickleNotAllowed` naming them, before
    anything is read); ``"weights_only"`` loads them only if torch's restricted
    unpickler accepts them; ``True`` hands them to DCP's planner as they are.
    """

    def __init__(
        self,
        root_or_store: str | os.PathLike[str] | Storage,
        *,
        storage_options: Mapping[str, Any] | None = None,
        transfer: TransferConfig | None = None,
        allow_pickle: bool | Literal["weights_only"] = False,
        full_verify: bool = False,
    ) -> None:
        super().__init__()
        if allow_pickle not in (False, True, "weights_only"):
            raise ValueError(f"allow_pickle must be False, True or 'weights_only', got {allow_pickle!r}")
        self._location = _Location(root_or_store, storage_options)
        self.transfer = transfer or TransferConfig()
        self.allow_pickle = allow_pickle
        self.full_verify = full_verify
        self.load_id = str(uuid.uuid4())
        self.storage_data: dict[MetadataIndex, ItemLocation] = {}

    def reset(self, checkpoint_id: str | os.PathLike[str] | None = None) -> None:
        self._location.reset(checkpoint_id)
        self.storage_data = {}
        self.load_id = str(uuid.uuid4())

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        where = f"{self.store.url}/{METADATA_KEY}"
        if kwargs.get("rank") is not None:
            raise NotFound(f"{where}: cloudckpt DCP checkpoints have no rank-local metadata")
        try:
            data = self.store.get(METADATA_KEY)
        except NotFound as exc:
            raise NotFound(f"{where}: no committed DCP checkpoint here (the metadata object is written last; "
                           "a save that failed never commits one)") from exc
        metadata = decode_metadata(data, where)
        if metadata.storage_meta is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata

    def set_up_storage_reader(self, metadata: Metadata, is_coordinator: bool, *args: Any, **kwargs: Any) -> None:
        if not isinstance(metadata.storage_data, dict):
            raise CorruptCheckpoint(f"{self.store.url}: DCP metadata has no storage data")
        self.storage_data = metadata.storage_data

    def prepare_local_plan(self, plan: LoadPlan) -> LoadPlan:
        missing = sorted({r.storage_index.fqn for r in plan.items if r.storage_index not in self.storage_data})
        if missing:
            raise CorruptCheckpoint(f"{self.store.url}/{METADATA_KEY}: the plan reads {missing[:5]}, "
                                    "which the metadata stores nowhere")
        pickled = sorted({r.dest_index.fqn for r in plan.items if r.type == LoadItemType.BYTE_IO})
        if pickled and self.allow_pickle is False:
            raise PickleNotAllowed(
                f"{self.store.url}: {pickled[:10]} {'is' if len(pickled) == 1 else 'are'} stored by DCP as "
                "pickles (torch.save of a non-tensor value), and DCP loads them with "
                "torch.load(weights_only=False), which can run code. Pass allow_pickle='weights_only' "
                "(torch's restricted unpickler: tensors, numbers, strings, plain containers) or "
                "allow_pickle=True if you trust this checkpoint, or leave those keys out of the state dict")
        return plan

    def prepare_global_plan(self, plans: list[LoadPlan]) -> list[LoadPlan]:
        return plans

    def read_data(self, plan: LoadPlan, planner: LoadPlanner) -> Future[None]:
        by_item: dict[MetadataIndex, list[ReadItem]] = {}
        for request in plan.items:
            by_item.setdefault(request.storage_index, []).append(request)
        locations = {index: self.storage_data[index] for index in by_item}
        uses: dict[str, int] = {}
        refs: dict[str, ChunkRef] = {}
        for location in locations.values():
            for key in {location.chunks[s.chunk_index].key for s in location.segments}:
                uses[key] = uses.get(key, 0) + 1
            refs.update((location.chunks[s.chunk_index].key, location.chunks[s.chunk_index])
                        for s in location.segments)
        self._check_sizes(list(refs.values()))
        fetcher = ChunkFetcher(self.store, self.transfer, full=self.full_verify)
        cache = _ChunkCache(fetcher, uses)
        planner_lock = threading.Lock()

        def load(index: MetadataIndex) -> None:
            location = locations[index]
            stored = self._assemble(location, cache)
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
        done: Future[None] = Future()
        done.set_result(None)
        return done

    def _check_sizes(self, refs: list[ChunkRef]) -> None:
        def check(ref: ChunkRef) -> None:
            where = f"{self.store.url}/{ref.key}"
            try:
                size = self.store.head(ref.key).size
            except NotFound as exc:
                raise CorruptCheckpoint(f"{where}: chunk is missing (referenced by {METADATA_KEY})") from exc
            if size != ref.size:
                raise CorruptCheckpoint(f"{where}: chunk has {size} bytes, {METADATA_KEY} says {ref.size}")

        with ThreadPoolExecutor(max_workers=self.transfer.concurrency, thread_name_prefix="cloudckpt-head") as pool:
            list(pool.map(check, refs))

    def _assemble(self, location: ItemLocation, cache: _ChunkCache) -> torch.Tensor:
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

    def _deliver(self, request: ReadItem, location: ItemLocation, stored: torch.Tensor, planner: LoadPlanner) -> None:
        fqn = request.dest_index.fqn
        if request.type == LoadItemType.BYTE_IO:
            if location.kind != "bytes":
                raise CorruptCheckpoint(f"{self.store.url}: {fqn!r} is a tensor in the checkpoint, not bytes")
            payload = tensor_bytes(stored).tobytes()
            if self.allow_pickle == "weights_only":
                try:
                    torch.load(io.BytesIO(payload), weights_only=True)
                except Exception as exc:
                    raise PickleNotAllowed(
                        f"{self.store.url}: {fqn!r} is refused by torch's weights-only unpickler ({exc}); "
                        "pass allow_pickle=True only if you trust this checkpoint") from exc
            elif self.allow_pickle is not True:
                raise PickleNotAllowed(f"{self.store.url}: {fqn!r} is a pickle; pass allow_pickle to load it")
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
