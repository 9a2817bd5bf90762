"""The manifest: one JSON object that is a checkpoint's commit record.

A checkpoint exists if and only if its manifest exists.  The manifest lists
every chunk (key, size, CRC32C, BLAKE3) and where each tensor's bytes lie in
them, carries the JSON tree of the state, the run's metadata, and a SHA-256 of
its own canonical form.  ``docs/FORMAT.md`` is the normative description.

Manifests are parsed as hostile input: every field is type- and range-checked
before anything is read from storage on its behalf.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import math
import re
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

from ..errors import CorruptCheckpoint, FormatVersionError
from ..storage.lifecycle import CHUNK_PREFIX
from .dtypes import TENSOR_DTYPES
from .layout import check_layout
from .parts import PartRef, decode_part_refs, encode_part_refs
from .serialize import Segment

FORMAT_NAME = "cloudckpt"
FORMAT_VERSION = 3
READABLE_VERSIONS = (1, 2, 3)
#: The timeline of every checkpoint written before timelines existed (format versions 1 and 2).
MAIN_TIMELINE = "main"
_TIMELINE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
MANIFEST_SUFFIX = ".ckpt"
REASONS = ("periodic", "best", "manual", "exception", "preemption", "final")
COMPRESSIONS = ("none", "zstd")
#: Bound on a manifest's size; a larger one is refused before parsing.
MAX_MANIFEST_BYTES = 256 * 1024 * 1024
_CHUNK_KEY = re.compile(r"^chunks/([0-9a-f]{2})/([0-9a-f]{64})(\.zst)?$")
_HEX8 = re.compile(r"^[0-9a-f]{8}$")
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_MANIFEST_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._=+-]{0,200}\.ckpt$")


def chunk_key(content_hash: str, compression: str = "none") -> str:
    """Storage key of a chunk: ``chunks/<first two hex>/<blake3 hex>`` (``.zst`` when compressed)."""
    suffix = ".zst" if compression == "zstd" else ""
    return f"{CHUNK_PREFIX}{content_hash[:2]}/{content_hash}{suffix}"


def is_manifest_name(name: str) -> bool:
    return bool(_MANIFEST_NAME.match(name))


def check_manifest_name(name: str) -> str:
    if not is_manifest_name(name):
        raise ValueError(
            f"invalid checkpoint name {name!r}: use letters, digits and ._=+- ending in '.ckpt'"
        )
    return name


@dataclass(frozen=True)
class ChunkRef:
    """One stored chunk.  ``size`` and ``crc32c`` describe the stored bytes; ``hash`` the content."""

    key: str
    hash: str
    size: int
    crc32c: str
    raw_size: int


@dataclass(frozen=True)
class TensorEntry:
    dtype: str
    shape: tuple[int, ...]
    device: str
    nbytes: int
    segments: tuple[Segment, ...]


@dataclass(frozen=True)
class Lineage:
    """Where a checkpoint's run came from: its timeline (branch) and the checkpoint it continues.

    ``parent`` is the checkpoint the state was restored from or last saved as by the same
    process (None for the first save of a fresh start).  ``timeline`` names the branch of the
    root's history the checkpoint belongs to; see :mod:`cloudckpt.timeline`.
    """

    timeline: str = MAIN_TIMELINE
    parent: str | None = None


def is_timeline_id(text: object) -> bool:
    return isinstance(text, str) and bool(_TIMELINE_ID.match(text))


@dataclass
class Manifest:
    """Everything a reader needs to locate, verify and rebuild one checkpoint."""

    name: str
    step: int
    epoch: int | None
    reason: str
    created: str
    state: Any
    tensors: list[TensorEntry]
    chunks: list[ChunkRef]
    metrics: dict[str, float | None] = field(default_factory=dict)
    compression: str = "none"
    library_version: str = ""
    host: str = ""
    config: dict[str, Any] = field(default_factory=dict)
    pickled: bool = False
    lineage: Lineage = field(default_factory=Lineage)
    format_version: int = FORMAT_VERSION
    parts: list[PartRef] | None = None  # a distributed checkpoint's per-rank parts (format/parts.py)

    @property
    def nbytes(self) -> int:
        """Bytes of tensor data the checkpoint holds (before compression)."""
        return sum(t.nbytes for t in self.tensors) + sum(p.nbytes for p in self.parts or ())

    @property
    def stored_bytes(self) -> int:
        return sum(c.size for c in self.chunks)

    @property
    def created_at(self) -> _dt.datetime:
        return _dt.datetime.fromisoformat(self.created.replace("Z", "+00:00"))

    def to_json(self) -> dict[str, Any]:
        body = {
            "format": FORMAT_NAME,
            "format_version": self.format_version,
            "name": self.name,
            "step": self.step,
            "epoch": self.epoch,
            "reason": self.reason,
            "created": self.created,
            "metrics": {k: _encode_metric(v) for k, v in self.metrics.items()},
            "library_version": self.library_version,
            "host": self.host,
            "config": self.config,
            "pickled": self.pickled,
            "lineage": {"timeline": self.lineage.timeline, "parent": self.lineage.parent},
            "compression": self.compression,
            "hash_algorithm": "blake3",
            "checksum_algorithm": "crc32c",
            "chunks": [asdict(c) for c in self.chunks],
            "tensors": [
                {
                    "dtype": t.dtype,
                    "shape": list(t.shape),
                    "device": t.device,
                    "nbytes": t.nbytes,
                    "segments": [[s.chunk_index, s.chunk_offset, s.tensor_offset, s.length] for s in t.segments],
                }
                for t in self.tensors
            ],
            "state": self.state,
        }
        if self.parts is not None:
            body["parts"] = encode_part_refs(self.parts)
        body["manifest_sha256"] = canonical_sha256(body)
        return body

    def to_bytes(self) -> bytes:
        # Not sort_keys: the state tree keeps the order of the user's dicts (a module's
        # state_dict order).  The checksum is over the canonical (sorted) form regardless.
        indent = None if self.parts else 1  # one line per rank would make a many-rank commit slow to write
        return json.dumps(self.to_json(), indent=indent, allow_nan=False).encode()


def canonical_sha256(body: dict[str, Any]) -> str:
    """SHA-256 of the manifest without its ``manifest_sha256`` field, in canonical JSON.

    Canonical: keys sorted, separators ``(",", ":")``, ASCII only, as Python's
    ``json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True)`` writes it.
    """
    without = {k: v for k, v in body.items() if k != "manifest_sha256"}
    text = json.dumps(without, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)
    return hashlib.sha256(text.encode("ascii")).hexdigest()


def _encode_metric(value: float | None) -> Any:
    if value is None:
        return None
    if math.isfinite(value):
        return float(value)
    return {"__float__": "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")}


def _decode_metric(value: Any, where: str) -> float | None:
    if value is None or isinstance(value, (int, float)) and not isinstance(value, bool):
        return None if value is None else float(value)
    if isinstance(value, dict) and value.get("__float__") in ("nan", "inf", "-inf"):
        return float(value["__float__"])
    raise CorruptCheckpoint(f"{where}: metric value {value!r} is not a number")


# -- parsing -----------------------------------------------------------------

MIGRATIONS: dict[int, Callable[[dict[str, Any]], dict[str, Any]]] = {}


def migration(from_version: int):
    """Register the function that turns a version-``from_version`` manifest into the next version."""

    def register(fn: Callable[[dict[str, Any]], dict[str, Any]]):
        MIGRATIONS[from_version] = fn
        return fn

    return register


@migration(1)
def _v1_to_v2(body: dict[str, Any]) -> dict[str, Any]:
    """v1 had no compression and named chunk checksums ``crc``; v2 adds ``compression`` and ``raw_size``."""
    body = dict(body)
    body["compression"] = "none"
    body["chunks"] = [
        {"key": c.get("key"), "hash": c.get("hash"), "size": c.get("size"),
         "crc32c": c.get("crc"), "raw_size": c.get("size")}
        if isinstance(c, dict) else c
        for c in body.get("chunks", [])
    ]
    body["format_version"] = 2
    return body


@migration(2)
def _v2_to_v3(body: dict[str, Any]) -> dict[str, Any]:
    """v2 had no timelines (every checkpoint of an old root is on the one timeline ``main``) and no
    distributed parts (those are optional)."""
    body = dict(body)
    body["lineage"] = {"timeline": MAIN_TIMELINE, "parent": None}
    body["format_version"] = 3
    return body


def parse_manifest(data: bytes, where: str) -> Manifest:
    """Parse, checksum-verify, migrate and validate manifest bytes; ``where`` names the object in errors."""
    if len(data) > MAX_MANIFEST_BYTES:
        raise CorruptCheckpoint(f"{where}: manifest is {len(data)} bytes, over the {MAX_MANIFEST_BYTES} limit")
    try:
        body = json.loads(data.decode("utf-8"), parse_constant=_refuse_constant, parse_float=_finite_float)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError, ValueError) as exc:
        raise CorruptCheckpoint(f"{where}: manifest is not valid JSON ({exc}); it may be truncated") from exc
    if not isinstance(body, dict) or body.get("format") != FORMAT_NAME:
        raise CorruptCheckpoint(f"{where}: not a cloudckpt manifest (missing 'format': 'cloudckpt')")
    version = body.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool):
        raise CorruptCheckpoint(f"{where}: 'format_version' is missing or not an integer")
    if version not in READABLE_VERSIONS:
        raise FormatVersionError(
            f"{where}: written in format version {version}; this release of cloudckpt reads "
            f"versions {', '.join(map(str, READABLE_VERSIONS))}. "
            + ("Upgrade cloudckpt to read it." if version > FORMAT_VERSION else "")
        )
    if body.get("manifest_sha256") != canonical_sha256(body):
        raise CorruptCheckpoint(f"{where}: manifest checksum mismatch; the manifest is damaged")
    while version < FORMAT_VERSION:
        body = MIGRATIONS[version](body)
        version = body["format_version"]
    return _validate(body, where)


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"non-standard JSON constant {name}")


def _finite_float(text: str) -> float:
    # 1e999 parses as inf, which no writer produces and the canonical checksum JSON cannot hold.
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"number {text[:40]} is out of range")
    return value


def _validate(body: dict[str, Any], where: str) -> Manifest:
    v = _Validator(where)
    name = v.string(body, "name")
    if not is_manifest_name(name):
        raise CorruptCheckpoint(f"{where}: invalid checkpoint name {name!r}")
    compression = v.string(body, "compression")
    if compression not in COMPRESSIONS:
        raise CorruptCheckpoint(f"{where}: unknown compression {compression!r}")
    chunks = [v.chunk(c, i, compression) for i, c in enumerate(v.list(body, "chunks"))]
    tensors = [v.tensor(t, i, chunks) for i, t in enumerate(v.list(body, "tensors"))]
    check_layout([(t.nbytes, t.segments) for t in tensors], where)
    metrics = v.dict(body, "metrics")
    epoch = body.get("epoch")
    if epoch is not None:
        epoch = v.integer(body, "epoch")
    reason = v.string(body, "reason")
    if reason not in REASONS:
        raise CorruptCheckpoint(f"{where}: unknown reason {reason!r}")
    created = v.string(body, "created")
    try:
        created_at = _dt.datetime.fromisoformat(created.replace("Z", "+00:00"))
    except ValueError as exc:
        raise CorruptCheckpoint(f"{where}: 'created' is not an ISO timestamp: {created!r}") from exc
    if created_at.utcoffset() is None:  # a naive time cannot be ordered against the others
        raise CorruptCheckpoint(f"{where}: 'created' has no UTC offset: {created!r}")
    pickled = body.get("pickled", False)
    if not isinstance(pickled, bool):
        raise CorruptCheckpoint(f"{where}: 'pickled' must be a boolean")
    return Manifest(
        name=name,
        step=v.integer(body, "step"),
        epoch=epoch,
        reason=reason,
        created=created,
        state=body.get("state"),
        tensors=tensors,
        chunks=chunks,
        metrics={str(k): _decode_metric(m, f"{where}: metrics[{k!r}]") for k, m in metrics.items()},
        compression=compression,
        library_version=str(body.get("library_version", "")),
        host=str(body.get("host", "")),
        config=v.dict(body, "config"),
        pickled=pickled,
        lineage=v.lineage(body),
        parts=decode_part_refs(body.get("parts"), where),
    )


class _Validator:
    def __init__(self, where: str) -> None:
        self.where = where

    def fail(self, what: str) -> CorruptCheckpoint:
        return CorruptCheckpoint(f"{self.where}: {what}")

    def integer(self, obj: dict, key: str, minimum: int = 0) -> int:
        value = obj.get(key)
        if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
            raise self.fail(f"{key!r} must be an integer >= {minimum}, got {value!r}")
        return value

    def string(self, obj: dict, key: str) -> str:
        value = obj.get(key)
        if not isinstance(value, str):
            raise self.fail(f"{key!r} must be a string, got {type(value).__name__}")
        return value

    def list(self, obj: dict, key: str) -> list:
        value = obj.get(key)
        if not isinstance(value, list):
            raise self.fail(f"{key!r} must be a list, got {type(value).__name__}")
        return value

    def dict(self, obj: dict, key: str) -> dict:
        value = obj.get(key, {})
        if not isinstance(value, dict):
            raise self.fail(f"{key!r} must be an object, got {type(value).__name__}")
        return value

    def lineage(self, body: dict) -> Lineage:
        raw = body.get("lineage")
        if not isinstance(raw, dict):
            raise self.fail("'lineage' must be an object with 'timeline' and 'parent'")
        timeline, parent = raw.get("timeline"), raw.get("parent")
        if not is_timeline_id(timeline):
            raise self.fail(f"lineage: timeline {str(timeline)[:80]!r} is not a timeline id")
        if parent is not None and not (isinstance(parent, str) and is_manifest_name(parent)):
            raise self.fail(f"lineage: parent {str(parent)[:80]!r} is not a checkpoint name")
        return Lineage(timeline, parent)

    def chunk(self, raw: Any, index: int, compression: str) -> ChunkRef:
        if not isinstance(raw, dict):
            raise self.fail(f"chunks[{index}] must be an object")
        key, content_hash, crc = (self.string(raw, k) for k in ("key", "hash", "crc32c"))
        match = _CHUNK_KEY.match(key)
        if not match or match.group(2) != content_hash or match.group(1) != content_hash[:2]:
            raise self.fail(f"chunks[{index}]: key {key!r} is not chunks/<hh>/<its blake3 hash>")
        if bool(match.group(3)) != (compression == "zstd"):
            raise self.fail(f"chunks[{index}]: key {key!r} does not match compression {compression!r}")
        if not _HEX64.match(content_hash) or not _HEX8.match(crc):
            raise self.fail(f"chunks[{index}]: malformed hash or crc32c")
        size, raw_size = self.integer(raw, "size"), self.integer(raw, "raw_size")
        if compression == "none" and raw_size != size:
            raise self.fail(f"chunks[{index}]: raw_size {raw_size} differs from size {size} of an uncompressed chunk")
        return ChunkRef(key, content_hash, size, crc, raw_size)

    def tensor(self, raw: Any, index: int, chunks: list[ChunkRef]) -> TensorEntry:
        if not isinstance(raw, dict):
            raise self.fail(f"tensors[{index}] must be an object")
        shape = raw.get("shape")
        if not isinstance(shape, list) or not all(
            isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape
        ):
            raise self.fail(f"tensors[{index}]: shape must be a list of non-negative integers")
        nbytes = self.integer(raw, "nbytes")
        segments = []
        covered = 0
        for raw_segment in self.list(raw, "segments"):
            if (not isinstance(raw_segment, list) or len(raw_segment) != 4
                    or not all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in raw_segment)):
                raise self.fail(f"tensors[{index}]: a segment must be 4 non-negative integers")
            segment = Segment(*raw_segment)
            if segment.chunk_index >= len(chunks):
                raise self.fail(f"tensors[{index}]: segment names chunk {segment.chunk_index} of {len(chunks)}")
            if segment.chunk_offset + segment.length > chunks[segment.chunk_index].raw_size:
                raise self.fail(f"tensors[{index}]: segment runs past the end of chunk {segment.chunk_index}")
            if segment.tensor_offset != covered:
                raise self.fail(f"tensors[{index}]: segments must cover the tensor in order")
            covered += segment.length
            segments.append(segment)
        if covered != nbytes:
            raise self.fail(f"tensors[{index}]: segments cover {covered} of {nbytes} bytes")
        dtype = self.string(raw, "dtype")
        if dtype not in TENSOR_DTYPES:
            raise self.fail(f"tensors[{index}]: unknown dtype {dtype[:40]!r}")
        if nbytes != math.prod(shape) * TENSOR_DTYPES[dtype].itemsize:
            raise self.fail(f"tensors[{index}]: {nbytes} bytes do not fit a {dtype} tensor of shape {shape}")
        return TensorEntry(
            dtype=dtype,
            shape=tuple(shape),
            device=self.string(raw, "device"),
            nbytes=nbytes,
            segments=tuple(segments),
        )
