"""One rank's part of a distributed checkpoint: what it stored, written create-only before the commit.

A part is one JSON object (``format: "cloudckpt-part"``, version 1)::

    {"format": "cloudckpt-part", "format_version": 1, "checkpoint": NAME, "rank": R, "world_size": W,
     "dcp": {...},    # DCP metadata (cloudckpt-dcp JSON) of the items this rank wrote: the shards it
                      # owns, the replicated values assigned to it, their chunks and segments
     "own": {...}}    # a manifest body (same checks) with this rank's per-rank state: RNG, ...

It is stored at ``parts/<hh>/<NAME>/r<R>-<sha256>.json`` (format/parts.py) and
the committed manifest carries its SHA-256 and size, which a reader checks
before parsing it.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import socket
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch.distributed.checkpoint.metadata import (
    BytesStorageMetadata,
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    StorageMeta,
    TensorStorageMetadata,
)
from torch.distributed.checkpoint.planner import WriteItem, WriteItemType

from .. import __version__
from ..errors import AlreadyExists, CorruptCheckpoint, FormatVersionError, NotFound
from ..format.manifest import ChunkRef, Manifest, parse_manifest
from ..format.parts import PartRef
from ..format.serialize import flatten, has_pickled_leaves
from ..integrations._dcp_io import store_items
from ..integrations._dcp_metadata import DCP_VERSION, ItemLocation, decode_metadata_body, encode_metadata
from ..storage import Storage
from ..transfer import TransferConfig
from ..writer import WriteStats, host_copy, upload_tensors

PART_FORMAT = "cloudckpt-part"
PART_VERSION = 1
MAX_PART_BYTES = 256 * 1024 * 1024


@dataclass
class RankPart:
    """A parsed part: the DCP metadata of what the rank wrote, and its per-rank state as a manifest."""

    checkpoint: str
    rank: int
    world_size: int
    metadata: Metadata
    own: Manifest

    @property
    def chunks(self) -> list[ChunkRef]:
        refs = {c.key: c for c in self.own.chunks}
        for location in (self.metadata.storage_data or {}).values():
            refs.update((c.key, c) for c in location.chunks)
        return list(refs.values())


@dataclass
class WrittenPart:
    ref: PartRef
    chunks: list[ChunkRef]
    stats: WriteStats


@dataclass
class PartRequest:
    """What one rank stores: the planned DCP items it owns, with the planner that resolves them,
    and its per-rank state."""

    checkpoint: str
    step: int
    reason: str
    rank: int
    world_size: int
    items: list[WriteItem]
    planner: Any
    own_state: Mapping[str, Any]
    allow_pickle: bool = False


def write_part(store: Storage, request: PartRequest, transfer: TransferConfig,
               known_chunks: Mapping[str, ChunkRef]) -> WrittenPart:
    """Upload the rank's data, then its part object (create-only); return the digest rank 0 needs."""
    # Shards apart from replicated items: every reader fetches rank 0's replicated ones, so they must not
    # share pack chunks with rank 0's shards, which only the readers of those shards need.
    groups = ([i for i, item in enumerate(request.items) if item.type != WriteItemType.SHARD],
              [i for i, item in enumerate(request.items) if item.type == WriteItemType.SHARD])
    placed: dict[int, ItemLocation] = {}
    stats = WriteStats()
    for group in groups:
        if group:
            stored, group_stats = store_items(store, [request.items[i] for i in group], request.planner, transfer,
                                              known_chunks)
            placed.update(zip(group, stored))
            _add_stats(stats, group_stats)
    locations = [placed[i] for i in range(len(request.items))]
    flat = flatten(request.own_state, allow_pickle=request.allow_pickle)
    own = upload_tensors(store, [host_copy(t) for t in flat.tensors], transfer, dict(known_chunks),
                         devices=[str(t.device) for t in flat.tensors])
    _add_stats(stats, own.stats)
    manifest = Manifest(
        name=request.checkpoint, step=request.step, epoch=None, reason=request.reason,
        created=_dt.datetime.now(_dt.timezone.utc).isoformat().replace("+00:00", "Z"), state=flat.tree,
        tensors=own.tensors, chunks=own.chunks, compression=transfer.compression, library_version=__version__,
        host=socket.gethostname(), pickled=request.allow_pickle and has_pickled_leaves(flat.tree),
    )
    metadata = _local_metadata(request.items, locations, getattr(request.planner, "mappings", {}))
    body = {
        "format": PART_FORMAT, "format_version": PART_VERSION, "checkpoint": request.checkpoint,
        "rank": request.rank, "world_size": request.world_size,
        "dcp": json.loads(encode_metadata(metadata, compression=transfer.compression, library_version=__version__)),
        "own": manifest.to_json(),
    }
    data = json.dumps(body, separators=(",", ":"), allow_nan=False).encode()
    ref = PartRef(request.rank, hashlib.sha256(data).hexdigest(), len(data),
                  sum(loc.nbytes for loc in locations) + manifest.nbytes)
    try:
        store.put(ref.key(request.checkpoint), data, mode="create")
    except AlreadyExists:
        pass  # the same bytes (the key is their hash): a retry of this very part
    chunks = {c.key: c for loc in locations for c in loc.chunks}
    chunks.update((c.key, c) for c in own.chunks)
    return WrittenPart(ref, list(chunks.values()), stats)


def _add_stats(total: WriteStats, more: WriteStats) -> None:
    for name in ("chunks_uploaded", "chunks_reused", "bytes_uploaded", "bytes_reused"):
        setattr(total, name, getattr(total, name) + getattr(more, name))


def _local_metadata(items: list[WriteItem], locations: list[ItemLocation], mappings: Mapping[str, Any]) -> Metadata:
    state_md: dict[str, Any] = {}
    storage: dict[MetadataIndex, ItemLocation] = {}
    for item, location in zip(items, locations):
        fqn = item.index.fqn
        if item.type == WriteItemType.BYTE_IO:
            state_md[fqn] = BytesStorageMetadata()
        else:
            data = item.tensor_data
            assert data is not None
            md = state_md.setdefault(fqn, TensorStorageMetadata(data.properties, data.size, []))
            md.chunks.append(ChunkStorageMetadata(data.chunk.offsets, data.chunk.sizes))
        storage[item.index] = location
    return Metadata(state_dict_metadata=state_md, storage_data=storage, version=DCP_VERSION, storage_meta=StorageMeta(),
                    planner_data={fqn: mappings[fqn] for fqn in state_md if fqn in mappings})


def decode_part(data: bytes, where: str, checkpoint: str, rank: int) -> RankPart:
    if len(data) > MAX_PART_BYTES:
        raise CorruptCheckpoint(f"{where}: part is {len(data)} bytes, over the {MAX_PART_BYTES} limit")
    try:
        body = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise CorruptCheckpoint(f"{where}: part is not valid JSON ({exc})") from exc
    if not isinstance(body, dict) or body.get("format") != PART_FORMAT:
        raise CorruptCheckpoint(f"{where}: not a cloudckpt part (missing 'format': {PART_FORMAT!r})")
    if body.get("format_version") != PART_VERSION:
        raise FormatVersionError(f"{where}: part format version {body.get('format_version')!r}; this release "
                                 f"reads version {PART_VERSION}")
    if body.get("checkpoint") != checkpoint or body.get("rank") != rank:
        raise CorruptCheckpoint(f"{where}: the part says it is rank {body.get('rank')!r} of "
                                f"{body.get('checkpoint')!r}, not rank {rank} of {checkpoint!r}")
    world = body.get("world_size")
    dcp, own = body.get("dcp"), body.get("own")
    if type(world) is not int or not isinstance(dcp, dict) or not isinstance(own, dict):
        raise CorruptCheckpoint(f"{where}: a part needs 'world_size', 'dcp' and 'own'")
    metadata = decode_metadata_body(dcp, where)
    manifest = parse_manifest(json.dumps(own).encode(), where)
    return RankPart(checkpoint, rank, world, metadata, manifest)


class PartSource:
    """Fetches, verifies (SHA-256 and size from the manifest) and caches the parts of one checkpoint."""

    def __init__(self, store: Storage, manifest: Manifest, concurrency: int = 16) -> None:
        if manifest.parts is None:
            raise ValueError(f"{manifest.name} has no parts")
        self.store = store
        self.manifest = manifest
        self.refs = manifest.parts
        self.concurrency = concurrency
        self.cache: dict[int, RankPart] = {}
        self.requests = 0

    @property
    def world_size(self) -> int:
        return len(self.refs)

    def fetch(self, ranks: set[int] | range) -> list[RankPart]:
        wanted = sorted(set(ranks) - set(self.cache))
        if wanted:
            with ThreadPoolExecutor(max_workers=min(self.concurrency, len(wanted))) as pool:
                for part in pool.map(self._get, wanted):
                    self.cache[part.rank] = part
        return [self.cache[r] for r in sorted(set(ranks))]

    def add(self, rank: int, data: bytes) -> RankPart:
        """A part read elsewhere (rank 0 reads part 0 for everyone): verified and parsed like a fetched one."""
        part = self.cache[rank] = self._parse(rank, data)
        return part

    def _get(self, rank: int) -> RankPart:
        key = self.refs[rank].key(self.manifest.name)
        try:
            data = self.store.get(key)
        except NotFound as exc:
            raise CorruptCheckpoint(f"{self.store.url}/{key}: part of rank {rank} is missing (listed by "
                                    f"{self.manifest.name})") from exc
        self.requests += 1
        return self._parse(rank, data)

    def _parse(self, rank: int, data: bytes) -> RankPart:
        ref = self.refs[rank]
        where = f"{self.store.url}/{ref.key(self.manifest.name)}"
        if len(data) != ref.size or hashlib.sha256(data).hexdigest() != ref.sha256:
            raise CorruptCheckpoint(f"{where}: part does not match the SHA-256 and size its manifest records")
        return decode_part(data, where, self.manifest.name, rank)


def merge_metadata(parts: list[RankPart], where: str) -> Metadata:
    """One DCP Metadata over several parts: each tensor's chunks are the union of the ranks' shards."""
    state_md: dict[str, Any] = {}
    storage: dict[MetadataIndex, ItemLocation] = {}
    planner_data: dict[str, Any] = {}
    for part in parts:
        md_in = part.metadata
        for fqn, md in md_in.state_dict_metadata.items():
            known = state_md.get(fqn)
            if known is None:
                state_md[fqn] = md if isinstance(md, BytesStorageMetadata) else replace(md, chunks=list(md.chunks))
            elif isinstance(md, TensorStorageMetadata) != isinstance(known, TensorStorageMetadata) or (
                    isinstance(md, TensorStorageMetadata)
                    and (md.size != known.size or md.properties.dtype != known.properties.dtype)):
                raise CorruptCheckpoint(f"{where}: ranks disagree about {fqn!r} (rank {part.rank}: {md})")
            elif isinstance(md, TensorStorageMetadata):
                known.chunks.extend(md.chunks)
        storage.update(md_in.storage_data or {})
        planner_data.update(md_in.planner_data or {})
    return Metadata(state_dict_metadata=state_md, storage_data=storage, planner_data=planner_data,
                    version=DCP_VERSION, storage_meta=StorageMeta())


def empty_like_metadata(md: TensorStorageMetadata) -> torch.Tensor:
    return torch.empty(md.size, dtype=md.properties.dtype)
