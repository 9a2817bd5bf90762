"""DCP's ``Metadata`` <-> JSON, explicitly and without pickle.

``FileSystemWriter`` pickles the whole :class:`~torch.distributed.checkpoint.metadata.Metadata`
object; loading such a checkpoint unpickles attacker-controlled bytes.  Here every
field is written as plain JSON and rebuilt field by field, with every value
type- and range-checked, so reading the commit record of a DCP checkpoint runs no code.

What the JSON holds (``format: "cloudckpt-dcp"``, version 1):

* ``state_dict``: fqn -> ``{"type": "tensor", dtype, layout, requires_grad,
  memory_format, pin_memory, size, chunks: [{offsets, sizes}]}`` or ``{"type": "bytes"}``
  (DCP's TensorStorageMetadata / BytesStorageMetadata).
* ``planner_data``: the planner's data (DefaultSavePlanner: fqn -> path tuple) in a
  tagged encoding that keeps tuples apart from lists; anything but plain values is refused.
* ``storage_meta``: checkpoint_id (as a string), save_id, modules.
* ``chunks``: the content-addressed objects (key, BLAKE3, stored size, CRC32C, raw size).
* ``items``: one per stored data item (DCP's MetadataIndex: fqn, offset, index hint) with
  its kind (tensor / bytes), dtype, shape, size and segments ``[chunk, chunk_offset,
  item_offset, length]`` covering it in order.
* ``pickled``: the fqns stored as DCP BytesIO items (``torch.save`` output: pickles).
* ``metadata_sha256``: SHA-256 of the canonical JSON of everything else.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import math
import re
from dataclasses import dataclass, fields
from typing import Any

import torch
from torch.distributed.checkpoint.metadata import (
    BytesStorageMetadata,
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    StorageMeta,
    TensorProperties,
    TensorStorageMetadata,
)

from ..errors import CorruptCheckpoint, FormatVersionError
from ..format.dtypes import ALL_DTYPES, TENSOR_DTYPES, dtype_name
from ..format.layout import check_layout
from ..format.manifest import ChunkRef, chunk_key
from ..format.serialize import Segment, UnsupportedValue

FORMAT_NAME = "cloudckpt-dcp"
FORMAT_VERSION = 1
#: The commit record of a DCP checkpoint: written create-only, last, by the coordinator.
METADATA_KEY = ".metadata.json"
#: What DCP's own writers put in ``Metadata.version``.
DCP_VERSION = "1.0.0"
MAX_METADATA_BYTES = 256 * 1024 * 1024
_MAX_DEPTH = 64
_HEX8 = re.compile(r"^[0-9a-f]{8}$")
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_LAYOUTS = ("strided", "sparse_coo", "sparse_csr", "sparse_csc", "sparse_bsr", "sparse_bsc", "_mkldnn", "jagged")
_MEMORY_FORMATS = ("contiguous_format", "channels_last", "channels_last_3d", "preserve_format")
_METADATA_FIELDS = {"state_dict_metadata", "planner_data", "storage_data", "storage_meta", "version"}


@dataclass(frozen=True, slots=True)
class ItemLocation:
    """Where one DCP data item's bytes are: ``segments`` over ``chunks`` (``chunk_index`` indexes ``chunks``).

    A tensor item is its shard's bytes, row-major, native byte order (``dtype``, ``shape``);
    a bytes item is DCP's BytesIO payload (``dtype`` ``"uint8"``, shape ``[nbytes]``).
    """

    kind: str
    dtype: str
    shape: tuple[int, ...]
    nbytes: int
    chunks: tuple[ChunkRef, ...]
    segments: tuple[Segment, ...]


# -- writing -------------------------------------------------------------------

def encode_metadata(metadata: Metadata, *, compression: str, library_version: str) -> bytes:
    """The JSON bytes of ``metadata``, whose ``storage_data`` maps MetadataIndex -> ItemLocation."""
    extra = {f.name for f in fields(metadata)} - _METADATA_FIELDS
    for name in sorted(extra):
        if getattr(metadata, name) is not None:
            raise UnsupportedValue(f"DCP Metadata.{name} is not known to cloudckpt's JSON metadata format; "
                                   "upgrade cloudckpt or leave it unset")
    storage_data = metadata.storage_data or {}
    table = _ChunkTable()
    items = []
    for index, location in storage_data.items():
        if not isinstance(location, ItemLocation):
            raise TypeError(f"storage_data[{index!r}] is a {type(location).__name__}, not an ItemLocation")
        remap = [table.place(ref, [(s.chunk_offset, s.chunk_offset + s.length)
                                   for s in location.segments if s.chunk_index == local])
                 for local, ref in enumerate(location.chunks)]
        items.append({
            "fqn": index.fqn,
            "offset": None if index.offset is None else list(index.offset),
            "index": index.index,
            "kind": location.kind,
            "dtype": location.dtype,
            "shape": list(location.shape),
            "nbytes": location.nbytes,
            "segments": [[remap[s.chunk_index], s.chunk_offset, s.tensor_offset, s.length]
                         for s in location.segments],
        })
    meta = metadata.storage_meta
    body: dict[str, Any] = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "dcp_version": metadata.version,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat().replace("+00:00", "Z"),
        "library_version": library_version,
        "compression": compression,
        "storage_meta": None if meta is None else {
            "checkpoint_id": None if meta.checkpoint_id is None else str(meta.checkpoint_id),
            "save_id": meta.save_id,
            "modules": [str(m) for m in meta.modules],
        },
        "planner_data": _encode_plain(metadata.planner_data, "planner_data", 0),
        "state_dict": {fqn: _encode_storage_md(fqn, md) for fqn, md in metadata.state_dict_metadata.items()},
        "chunks": [{"key": c.key, "hash": c.hash, "size": c.size, "crc32c": c.crc32c, "raw_size": c.raw_size}
                   for c in table.entries],
        "items": items,
        "pickled": sorted({i["fqn"] for i in items if i["kind"] == "bytes"}),
    }
    body["metadata_sha256"] = _canonical_sha256(body)
    return json.dumps(body, separators=(",", ":"), allow_nan=False).encode()


class _ChunkTable:
    """The metadata's chunk list.  Items share an entry while the bytes they take from it are disjoint
    (items packed into one chunk); an item whose bytes another item already takes (identical content,
    deduplicated to the same object) gets an entry of its own, as readers require (``check_layout``)."""

    def __init__(self) -> None:
        self.entries: list[ChunkRef] = []
        self._taken: dict[str, list[tuple[int, list[tuple[int, int]]]]] = {}

    def place(self, ref: ChunkRef, ranges: list[tuple[int, int]]) -> int:
        slots = self._taken.setdefault(ref.key, [])
        for position, taken in slots:
            if not any(start < t_end and t_start < end for start, end in ranges for t_start, t_end in taken):
                taken.extend(ranges)
                return position
        self.entries.append(ref)
        slots.append((len(self.entries) - 1, list(ranges)))
        return len(self.entries) - 1


def _encode_storage_md(fqn: str, md: Any) -> dict[str, Any]:
    if isinstance(md, BytesStorageMetadata):
        return {"type": "bytes"}
    if not isinstance(md, TensorStorageMetadata):
        raise UnsupportedValue(f"state_dict_metadata[{fqn!r}] is a {type(md).__name__}; "
                               "cloudckpt stores TensorStorageMetadata and BytesStorageMetadata")
    p = md.properties
    return {
        "type": "tensor",
        "dtype": dtype_name(p.dtype),
        "layout": str(p.layout).removeprefix("torch."),
        "requires_grad": bool(p.requires_grad),
        "memory_format": str(p.memory_format).removeprefix("torch."),
        "pin_memory": bool(p.pin_memory),
        "size": list(md.size),
        "chunks": [{"offsets": list(c.offsets), "sizes": list(c.sizes)} for c in md.chunks],
    }


def _encode_plain(value: Any, path: str, depth: int) -> Any:
    """Tagged JSON for plain Python values: ``{"l": [...]}`` list, ``{"t": [...]}`` tuple,
    ``{"d": [[k, v], ...]}`` dict, ``{"f": "nan"}`` non-finite float; scalars as they are."""
    if depth > _MAX_DEPTH:
        raise UnsupportedValue(f"{path}: nested deeper than {_MAX_DEPTH} levels")
    if value is None or type(value) in (bool, int, str):
        return value
    if type(value) is float:
        return value if math.isfinite(value) else {"f": str(value)}
    if isinstance(value, tuple) and type(value) in (tuple, torch.Size):
        return {"t": [_encode_plain(v, f"{path}[{i}]", depth + 1) for i, v in enumerate(value)]}
    if type(value) is list:
        return {"l": [_encode_plain(v, f"{path}[{i}]", depth + 1) for i, v in enumerate(value)]}
    if isinstance(value, dict):
        return {"d": [[_encode_plain(k, f"{path} key", depth + 1), _encode_plain(v, f"{path}[{k!r}]", depth + 1)]
                      for k, v in value.items()]}
    raise UnsupportedValue(f"{path}: a {type(value).__name__} cannot be stored as JSON, and cloudckpt does "
                           "not pickle DCP metadata; use a planner whose planner_data is plain data")


def _canonical_sha256(body: dict[str, Any]) -> str:
    without = {k: v for k, v in body.items() if k != "metadata_sha256"}
    text = json.dumps(without, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)
    return hashlib.sha256(text.encode("ascii")).hexdigest()


# -- reading (hostile input) -----------------------------------------------------

def decode_metadata(data: bytes, where: str) -> Metadata:
    """Parse and verify metadata JSON; ``storage_data`` maps MetadataIndex -> ItemLocation."""
    if len(data) > MAX_METADATA_BYTES:
        raise CorruptCheckpoint(f"{where}: metadata is {len(data)} bytes, over the {MAX_METADATA_BYTES} limit")
    try:
        body = json.loads(data.decode("utf-8"), parse_constant=_refuse_constant)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise CorruptCheckpoint(f"{where}: DCP metadata is not valid JSON ({exc}); it may be truncated, "
                                "or written by torch's FileSystemWriter (a pickle), which cloudckpt does not read") from exc
    if not isinstance(body, dict) or body.get("format") != FORMAT_NAME:
        raise CorruptCheckpoint(f"{where}: not cloudckpt DCP metadata (missing 'format': {FORMAT_NAME!r})")
    version = body.get("format_version")
    if type(version) is not int:
        raise CorruptCheckpoint(f"{where}: 'format_version' is missing or not an integer")
    if version != FORMAT_VERSION:
        raise FormatVersionError(f"{where}: DCP metadata format version {version}; this release of cloudckpt "
                                 f"reads version {FORMAT_VERSION}")
    return decode_metadata_body(body, where)


def decode_metadata_body(body: dict[str, Any], where: str) -> Metadata:
    """Verify and rebuild parsed metadata JSON (a version-checked object; also embedded in a rank's part)."""
    if body.get("metadata_sha256") != _canonical_sha256(body):
        raise CorruptCheckpoint(f"{where}: metadata checksum mismatch; the metadata object is damaged")
    return _Decoder(where).metadata(body)


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"non-standard JSON constant {name}")


class _Decoder:
    def __init__(self, where: str) -> None:
        self.where = where

    def fail(self, what: str) -> CorruptCheckpoint:
        return CorruptCheckpoint(f"{self.where}: {what}")

    def typed(self, obj: Any, key: str, kind: type, what: str) -> Any:
        value = obj.get(key) if isinstance(obj, dict) else None
        if type(value) is not kind:
            raise self.fail(f"{what}: {key!r} must be a {kind.__name__}, got {type(value).__name__}")
        return value

    def count(self, value: Any, what: str) -> int:
        if type(value) is not int or value < 0:
            raise self.fail(f"{what} must be a non-negative integer, got {str(value)[:40]}")
        return value

    def dims(self, value: Any, what: str) -> torch.Size:
        if type(value) is not list:
            raise self.fail(f"{what} must be a list of non-negative integers")
        return torch.Size([self.count(v, what) for v in value])

    def name(self, value: Any, choices: tuple[str, ...], what: str) -> str:
        if type(value) is not str or value not in choices:
            raise self.fail(f"{what} {str(value)[:40]!r} is not one of {list(choices)}")
        return value

    def metadata(self, body: dict[str, Any]) -> Metadata:
        compression = self.name(body.get("compression"), ("none", "zstd"), "compression")
        chunks = tuple(self.chunk(c, i, compression) for i, c in enumerate(self.typed(body, "chunks", list, "metadata")))
        state = self.typed(body, "state_dict", dict, "metadata")
        state_md = {fqn: self.storage_md(fqn, md) for fqn, md in state.items()}
        storage_data = {}
        for i, raw in enumerate(self.typed(body, "items", list, "metadata")):
            index, location = self.item(raw, i, chunks, state_md)
            if index in storage_data:
                raise self.fail(f"items[{i}]: {index.fqn!r} at offset {index.offset} is stored twice")
            storage_data[index] = location
        check_layout([(loc.nbytes, loc.segments) for loc in storage_data.values()], self.where, "items")
        version = body.get("dcp_version")
        if version is not None and type(version) is not str:
            raise self.fail("'dcp_version' must be a string")
        return Metadata(
            state_dict_metadata=state_md,
            planner_data=self.plain(body.get("planner_data"), "planner_data", 0),
            storage_data=storage_data,
            storage_meta=self.storage_meta(body.get("storage_meta")),
            version=version,
        )

    def storage_meta(self, raw: Any) -> StorageMeta:
        if raw is None:
            return StorageMeta()
        if not isinstance(raw, dict):
            raise self.fail("'storage_meta' must be an object")
        checkpoint_id, save_id, modules = raw.get("checkpoint_id"), raw.get("save_id"), raw.get("modules", [])
        if checkpoint_id is not None and type(checkpoint_id) is not str:
            raise self.fail("storage_meta.checkpoint_id must be a string")
        if save_id is not None and type(save_id) is not str:
            raise self.fail("storage_meta.save_id must be a string")
        if type(modules) is not list or not all(type(m) is str for m in modules):
            raise self.fail("storage_meta.modules must be a list of strings")
        return StorageMeta(checkpoint_id=checkpoint_id, save_id=save_id, modules=list(modules))

    def storage_md(self, fqn: str, raw: Any) -> TensorStorageMetadata | BytesStorageMetadata:
        what = f"state_dict[{fqn[:80]!r}]"
        kind = self.name(raw.get("type") if isinstance(raw, dict) else None, ("tensor", "bytes"), f"{what} type")
        if kind == "bytes":
            return BytesStorageMetadata()
        dtype = raw.get("dtype")
        if type(dtype) is not str or dtype not in ALL_DTYPES:
            raise self.fail(f"{what}: unknown dtype {str(dtype)[:40]!r}")
        layout = self.name(raw.get("layout"), _LAYOUTS, f"{what} layout")
        memory_format = self.name(raw.get("memory_format"), _MEMORY_FORMATS, f"{what} memory_format")
        flags = {k: raw.get(k) for k in ("requires_grad", "pin_memory")}
        if not all(type(v) is bool for v in flags.values()):
            raise self.fail(f"{what}: requires_grad and pin_memory must be booleans")
        size = self.dims(raw.get("size"), f"{what} size")
        shards = []
        for j, c in enumerate(self.typed(raw, "chunks", list, what)):
            offsets = self.dims(c.get("offsets") if isinstance(c, dict) else None, f"{what} chunks[{j}] offsets")
            sizes = self.dims(c.get("sizes") if isinstance(c, dict) else None, f"{what} chunks[{j}] sizes")
            if len(offsets) != len(size) or len(sizes) != len(size) or any(
                    o + s > d for o, s, d in zip(offsets, sizes, size)):
                raise self.fail(f"{what} chunks[{j}]: offsets {list(offsets)} + sizes {list(sizes)} "
                                f"do not fit in a tensor of size {list(size)}")
            shards.append(ChunkStorageMetadata(offsets=offsets, sizes=sizes))
        properties = TensorProperties(
            dtype=ALL_DTYPES[dtype], layout=getattr(torch, layout), requires_grad=flags["requires_grad"],
            memory_format=getattr(torch, memory_format), pin_memory=flags["pin_memory"],
        )
        return TensorStorageMetadata(properties=properties, size=size, chunks=shards)

    def chunk(self, raw: Any, i: int, compression: str) -> ChunkRef:
        what = f"chunks[{i}]"
        key, content_hash, crc = (self.typed(raw, k, str, what) for k in ("key", "hash", "crc32c"))
        if not _HEX64.match(content_hash) or not _HEX8.match(crc):
            raise self.fail(f"{what}: malformed hash or crc32c")
        if key != chunk_key(content_hash, compression):
            raise self.fail(f"{what}: key {key[:100]!r} is not chunks/<hh>/<its blake3 hash> for "
                            f"compression {compression!r}")
        return ChunkRef(key, content_hash, self.count(raw.get("size"), f"{what} size"), crc,
                        self.count(raw.get("raw_size"), f"{what} raw_size"))

    def item(self, raw: Any, i: int, chunks: tuple[ChunkRef, ...],
             state_md: dict[str, Any]) -> tuple[MetadataIndex, ItemLocation]:
        what = f"items[{i}]"
        fqn = self.typed(raw, "fqn", str, what)
        offset = raw.get("offset")
        offset = None if offset is None else self.dims(offset, f"{what} offset")
        hint = raw.get("index")
        if hint is not None:
            hint = self.count(hint, f"{what} index")
        kind = self.name(raw.get("kind"), ("tensor", "bytes"), f"{what} kind")
        dtype = raw.get("dtype")
        if type(dtype) is not str or dtype not in TENSOR_DTYPES:
            raise self.fail(f"{what}: unknown dtype {str(dtype)[:40]!r}")
        shape = self.dims(raw.get("shape"), f"{what} shape")
        nbytes = self.count(raw.get("nbytes"), f"{what} nbytes")
        if nbytes != math.prod(shape) * TENSOR_DTYPES[dtype].itemsize:
            raise self.fail(f"{what}: {nbytes} bytes do not fit a {dtype} tensor of shape {list(shape)}")
        md = state_md.get(fqn)
        if kind == "bytes":
            if not isinstance(md, BytesStorageMetadata) or dtype != "uint8" or len(shape) != 1 or offset is not None:
                raise self.fail(f"{what}: bytes item {fqn[:80]!r} does not match the state_dict metadata")
        else:
            if not isinstance(md, TensorStorageMetadata) or offset is None or not any(
                    c.offsets == offset and c.sizes == shape for c in md.chunks):
                raise self.fail(f"{what}: tensor item {fqn[:80]!r} at offset {offset and list(offset)} with shape "
                                f"{list(shape)} is not a chunk in the state_dict metadata")
            if dtype != dtype_name(md.properties.dtype):
                raise self.fail(f"{what}: dtype {dtype} differs from the state_dict metadata")
        segments, covered = [], 0
        for raw_segment in self.typed(raw, "segments", list, what):
            if (type(raw_segment) is not list or len(raw_segment) != 4
                    or not all(type(x) is int and x >= 0 for x in raw_segment)):
                raise self.fail(f"{what}: a segment must be 4 non-negative integers")
            segment = Segment(*raw_segment)
            if segment.chunk_index >= len(chunks):
                raise self.fail(f"{what}: segment names chunk {segment.chunk_index} of {len(chunks)}")
            if segment.chunk_offset + segment.length > chunks[segment.chunk_index].raw_size:
                raise self.fail(f"{what}: segment runs past the end of chunk {segment.chunk_index}")
            if segment.tensor_offset != covered:
                raise self.fail(f"{what}: segments must cover the item in order")
            covered += segment.length
            segments.append(segment)
        if covered != nbytes:
            raise self.fail(f"{what}: segments cover {covered} of {nbytes} bytes")
        location = ItemLocation(kind, dtype, tuple(shape), nbytes, chunks, tuple(segments))
        return MetadataIndex(fqn, offset, hint), location

    def plain(self, node: Any, path: str, depth: int) -> Any:
        if depth > _MAX_DEPTH:
            raise self.fail(f"{path}: nested deeper than {_MAX_DEPTH} levels")
        if node is None or type(node) in (bool, int, float, str):
            return node
        if type(node) is dict and len(node) == 1:
            (tag, payload), = node.items()
            if tag == "f" and payload in ("nan", "inf", "-inf"):
                return float(payload)
            if tag in ("l", "t", "d") and type(payload) is list:
                if tag == "l":
                    return [self.plain(v, f"{path}[{i}]", depth + 1) for i, v in enumerate(payload)]
                if tag == "t":
                    return tuple(self.plain(v, f"{path}[{i}]", depth + 1) for i, v in enumerate(payload))
                result = {}
                for pair in payload:
                    if type(pair) is not list or len(pair) != 2:
                        raise self.fail(f"{path}: a dict entry must be a [key, value] pair")
                    key = self.plain(pair[0], f"{path} key", depth + 1)
                    try:
                        result[key] = self.plain(pair[1], f"{path}[{key!r}]", depth + 1)
                    except TypeError as exc:  # an unhashable key (a list)
                        raise self.fail(f"{path}: unhashable dict key") from exc
                return result
        raise self.fail(f"{path}: not a tagged plain value: {str(node)[:80]}")
