"""Copy committed checkpoints between stores (S3 -> GCS -> local ...) with the commit protocol.

A copy is a commit at the destination, in the writer's order:

1. Every chunk the manifest lists is downloaded, checked against the
   manifest (size and CRC32C; BLAKE3 too with ``full_verify``), uploaded, and
   the size and CRC32C the destination reports are compared with the
   manifest's.  Chunks the destination already holds are skipped (see below).
2. The manifest is written with ``mode="create"``, last, byte for byte as the
   source stored it (its own checksum stays valid).  Until then the
   checkpoint does not exist at the destination.
3. ``latest.ckpt`` and the best pointers move forward only
   (:func:`~cloudckpt.pointers.advance_latest`, :func:`~cloudckpt.pointers.promote_best`),
   so copying an old checkpoint into a live run never moves its pointers back.
4. The destination's ``.cloudckpt/state.json`` index records the checkpoint.

Which destination chunks are trusted: a chunk a live destination manifest
references, or one stored less than ``reuse_window`` ago (left by an
interrupted copy, say).  An older unreferenced chunk is garbage that a
concurrent sweep may delete before our manifest commits, so it is uploaded
again, which also renews its age.  Keep the window well under the
destination's sweep grace period.
"""

from __future__ import annotations

import datetime as _dt
import logging
import math
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .errors import AlreadyExists, CorruptCheckpoint, FormatVersionError, NotFound
from .format.manifest import (
    ChunkRef,
    Manifest,
    check_manifest_name,
    parse_manifest,
)
from .pointers import (
    STATE_KEY,
    Pointer,
    advance_latest,
    best_pointer_key,
    is_pointer_key,
    list_manifest_names,
    list_pointer_keys,
    promote_best,
    read_pointer,
    update_json,
)
from .format.serialize import UnsupportedValue
from .parallel import run_parallel
from .reader import ChunkFetcher
from .storage.base import ObjectInfo, Storage, upload_multipart
from .storage.capabilities import check_writable
from .storage.lifecycle import CHUNK_PREFIX
from .transfer import TransferConfig

log = logging.getLogger(__name__)

#: ``progress(advance_bytes, total_bytes)``: called with ``(0, total)`` first, then once per chunk
#: copied, from the copy's worker threads (so it must be thread-safe).
Progress = Callable[[int, int], None]

DEFAULT_REUSE_WINDOW = _dt.timedelta(hours=1)


@dataclass
class CopyStats:
    """What one copy moved: chunks copied versus found at the destination, and where pointers went."""

    name: str = ""
    chunks_copied: int = 0
    chunks_skipped: int = 0
    bytes_copied: int = 0
    bytes_skipped: int = 0
    already_present: bool = False
    pointers_moved: list[str] = field(default_factory=list)

    def add(self, other: CopyStats) -> None:
        self.chunks_copied += other.chunks_copied
        self.chunks_skipped += other.chunks_skipped
        self.bytes_copied += other.bytes_copied
        self.bytes_skipped += other.bytes_skipped


manifest_names = list_manifest_names


class Copier:
    """Copies checkpoints from ``src`` to ``dst``; reuse one for several checkpoints of a run."""

    def __init__(
        self,
        src: Storage,
        dst: Storage,
        *,
        transfer: TransferConfig | None = None,
        full_verify: bool = False,
        reuse_window: _dt.timedelta = DEFAULT_REUSE_WINDOW,
        clock: Callable[[], _dt.datetime] = lambda: _dt.datetime.now(_dt.timezone.utc),
    ) -> None:
        self.src = src
        self.dst = dst
        self.transfer = transfer or TransferConfig()
        self.full_verify = full_verify
        self.reuse_window = reuse_window
        self.clock = clock
        self._dst_chunks: dict[str, ObjectInfo] | None = None
        self._dst_live: set[str] | None = None
        self._lock = threading.Lock()

    # -- what the destination holds ----------------------------------------------
    def _scan_destination(self) -> None:
        if self._dst_chunks is not None:
            return
        self._dst_chunks = {info.key: info for info in self.dst.list(CHUNK_PREFIX)}
        live: set[str] = set()
        for name in manifest_names(self.dst):
            try:
                live.update(c.key for c in parse_manifest(self.dst.get(name), f"{self.dst.url}/{name}").chunks)
            except (CorruptCheckpoint, FormatVersionError, NotFound) as exc:
                log.warning("not reusing chunks of %s/%s: %s", self.dst.url, name, exc)
        self._dst_live = live

    def _reusable(self, ref: ChunkRef) -> bool:
        assert self._dst_chunks is not None and self._dst_live is not None
        info = self._dst_chunks.get(ref.key)
        if info is None or info.size != ref.size:
            return False
        if info.crc32c is not None and info.crc32c != ref.crc32c:
            return False
        if ref.key in self._dst_live:
            return True
        young = info.last_modified is not None and self.clock() - info.last_modified < self.reuse_window
        return young

    # -- one checkpoint -------------------------------------------------------
    def copy(self, name: str, *, progress: Progress | None = None) -> CopyStats:
        check_manifest_name(name)
        check_writable(self.dst)  # the capability probe, once per process (storage/capabilities.py)
        if is_pointer_key(name):
            raise ValueError(f"{name!r} is a pointer object, not a checkpoint; copy the checkpoint it names")
        where = f"{self.src.url}/{name}"
        try:
            raw = self.src.get(name)
        except NotFound as exc:
            raise NotFound(f"{where}: no such checkpoint") from exc
        manifest = parse_manifest(raw, where)
        if manifest.name != name:
            raise CorruptCheckpoint(f"{where}: the manifest calls itself {manifest.name!r}")
        if manifest.parts is not None:
            raise UnsupportedValue(f"{where} was saved by DistributedCheckpointManager (it lists per-rank parts), "
                                   "which this release cannot copy; load it whole with CheckpointManager.load() "
                                   "and save that, or copy the root's objects with your storage tool")
        stats = CopyStats(name=name)
        if self._committed_identically(name, raw):
            stats.already_present = True
            stats.chunks_skipped = len(manifest.chunks)
            stats.bytes_skipped = manifest.stored_bytes
            if progress is not None:
                progress(0, 0)
        else:
            self._copy_chunks(manifest, stats, progress)
            try:
                self.dst.put(name, raw, mode="create")
            except AlreadyExists:
                if not self._committed_identically(name, raw):
                    raise AlreadyExists(
                        f"{self.dst.url}/{name}: a different checkpoint of that name was committed "
                        "meanwhile; it was left as it is"
                    ) from None
                stats.already_present = True
            with self._lock:
                if self._dst_live is not None:
                    self._dst_live.update(c.key for c in manifest.chunks)
        stats.pointers_moved = self._move_pointers(manifest)
        update_json(self.dst, STATE_KEY, lambda body: _record(body, manifest))
        log.info("copied %s to %s: %d chunks copied, %d skipped", where, self.dst.url,
                 stats.chunks_copied, stats.chunks_skipped)
        return stats

    def _committed_identically(self, name: str, raw: bytes) -> bool:
        """Whether ``dst`` already holds this very manifest; AlreadyExists if it holds another."""
        try:
            existing = self.dst.get(name)
        except NotFound:
            return False
        if existing != raw:
            raise AlreadyExists(
                f"{self.dst.url}/{name}: a different checkpoint of that name already exists there; "
                "nothing was copied"
            )
        return True

    def _copy_chunks(self, manifest: Manifest, stats: CopyStats, progress: Progress | None) -> None:
        self._scan_destination()
        unique = list({c.key: c for c in manifest.chunks}.values())
        todo = []
        for ref in unique:
            if self._reusable(ref):
                stats.chunks_skipped += 1
                stats.bytes_skipped += ref.size
            else:
                todo.append(ref)
        total = sum(ref.size for ref in todo)
        if progress is not None:
            progress(0, total)
        fetcher = ChunkFetcher(self.src, self.transfer, full=self.full_verify)

        def copy_one(ref: ChunkRef) -> None:
            data = fetcher.fetch_stored(ref)  # as stored (compressed for .zst), checked against the manifest
            self._put_chunk(ref, data)
            with self._lock:
                stats.chunks_copied += 1
                stats.bytes_copied += ref.size
                assert self._dst_chunks is not None
                self._dst_chunks[ref.key] = ObjectInfo(ref.key, ref.size, "", self.clock(), ref.crc32c)
            if progress is not None:
                progress(ref.size, total)

        try:
            run_parallel(copy_one, todo, workers=self.transfer.concurrency, name="cloudckpt-copy")
        finally:
            fetcher.close()

    def _put_chunk(self, ref: ChunkRef, data: memoryview) -> None:
        if ref.size > self.transfer.multipart_threshold:
            info = upload_multipart(self.dst, ref.key, data, part_size=self.transfer.part_size,
                                    concurrency=self.transfer.concurrency)
        else:
            info = self.dst.put(ref.key, data)
        if info.size != ref.size or (info.crc32c is not None and info.crc32c != ref.crc32c):
            raise CorruptCheckpoint(
                f"{self.dst.url}/{ref.key}: the destination reports {info.size} bytes crc32c "
                f"{info.crc32c} after the copy, but {ref.size} bytes crc32c {ref.crc32c} were sent"
            )

    # -- pointers -------------------------------------------------------------
    def _move_pointers(self, manifest: Manifest) -> list[str]:
        moved = []
        if advance_latest(self.dst, Pointer(manifest.name, manifest.step)):
            moved.append("latest.ckpt")
        for metric, mode in self._best_metrics().items():
            value = manifest.metrics.get(metric)
            if value is None or math.isnan(value):
                continue
            if promote_best(self.dst, Pointer(manifest.name, manifest.step, metric, value, mode)):
                moved.append(best_pointer_key(metric))
        return moved

    def _best_metrics(self) -> dict[str, str]:
        """metric -> mode of the best pointers at the destination, then at the source."""
        found: dict[str, str] = {}
        for store in (self.dst, self.src):
            for key in list_pointer_keys(store)[1:]:
                try:
                    pointer = read_pointer(store, key)
                except CorruptCheckpoint as exc:
                    log.warning("ignoring pointer: %s", exc)
                    continue
                if pointer is not None and pointer.metric and pointer.mode:
                    found.setdefault(pointer.metric, pointer.mode)
        return found


def _record(body: dict[str, Any], manifest: Manifest) -> dict[str, Any] | None:
    index = body.setdefault("checkpoints", {})
    if not isinstance(index, dict):
        body["checkpoints"] = index = {}
    entry = {
        "step": manifest.step, "epoch": manifest.epoch, "reason": manifest.reason,
        "created": manifest.created, "nbytes": manifest.nbytes,
        "metrics": {k: v for k, v in manifest.metrics.items() if v is not None and math.isfinite(v)},
    }
    if index.get(manifest.name) == entry and "version" in body:
        return None
    index[manifest.name] = entry
    body.setdefault("version", 1)
    return body


def copy_checkpoint(
    src: Storage,
    dst: Storage,
    name: str,
    *,
    progress: Progress | None = None,
    transfer: TransferConfig | None = None,
    full_verify: bool = False,
) -> CopyStats:
    """Copy the committed checkpoint ``name`` from ``src`` to ``dst`` (see the module doc).

    Idempotent: a checkpoint already committed identically at ``dst`` is not
    copied again (its pointers and index entry are still brought forward).
    Raises NotFound if ``src`` has no such checkpoint, AlreadyExists if
    ``dst`` has a different one of that name, CorruptCheckpoint if a chunk
    fails its checks in transit (the destination manifest is then not written).
    """
    return Copier(src, dst, transfer=transfer, full_verify=full_verify).copy(name, progress=progress)


__all__ = ["Copier", "CopyStats", "copy_checkpoint", "manifest_names"]
