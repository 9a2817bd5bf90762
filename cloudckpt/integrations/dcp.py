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
import uuid
from collections.abc import Mapping
from typing import Any, Literal

import torch
from torch.distributed.checkpoint.metadata import Metadata, MetadataIndex, StorageMeta
from torch.distributed.checkpoint.planner import (
    LoadItemType,
    LoadPlan,
    LoadPlanner,
    SavePlan,
    SavePlanner,
)
from torch.distributed.checkpoint.storage import (
    StorageReader,
    StorageWriter,
    WriteResult,
)
from torch.futures import Future

from .. import __version__
from ..errors import AlreadyExists, CorruptCheckpoint, NotFound
from ..format.serialize import PickleNotAllowed
from ..storage import Storage
from ..transfer import TransferConfig
from ._dcp_io import ItemReader, store_items
from ._dcp_location import AtLocation, Location
from ._dcp_metadata import (
    DCP_VERSION,
    METADATA_KEY,
    ItemLocation,
    decode_metadata,
    encode_metadata,
)

__all__ = ["METADATA_KEY", "CloudStorageReader", "CloudStorageWriter", "PickleNotAllowed"]

log = logging.getLogger(__name__)


class CloudStorageWriter(AtLocation, StorageWriter):
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
        self._location = Location(root_or_store, storage_options)
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

    def _write(self, items: list, planner: SavePlanner) -> list[WriteResult]:
        locations, stats = store_items(self.store, items, planner, self.transfer)
        log.info("rank %s: %d DCP items in %d chunks to %s (%.1f MiB uploaded)", self.rank, len(items),
                 stats.chunks_uploaded + stats.chunks_reused, self.store.url, stats.bytes_uploaded / 2**20)
        return [WriteResult(index=item.index, size_in_bytes=location.nbytes, storage_data=location)
                for item, location in zip(items, locations)]

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



class CloudStorageReader(AtLocation, StorageReader):
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
        self._location = Location(root_or_store, storage_options)
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
        reader = ItemReader(self.store, self.transfer, full_verify=self.full_verify, bytes_check=self._check_bytes)
        reader.read(plan.items, self.storage_data, planner, METADATA_KEY)
        done: Future[None] = Future()
        done.set_result(None)
        return done

    def _check_bytes(self, fqn: str, payload: bytes) -> None:
        if self.allow_pickle == "weights_only":
            try:
                torch.load(io.BytesIO(payload), weights_only=True)
            except Exception as exc:
                raise PickleNotAllowed(
                    f"{self.store.url}: {fqn!r} is refused by torch's weights-only unpickler ({exc}); "
                    "pass allow_pickle=True only if you trust this checkpoint") from exc
        elif self.allow_pickle is not True:
            raise PickleNotAllowed(f"{self.store.url}: {fqn!r} is a pickle; pass allow_pickle to load it")
