"""Deleting checkpoints and sweeping the chunks no checkpoint needs any more.

Order matters for promise 3 (nothing lost):

1. A checkpoint is removed by deleting its manifest, first.  From then on it
   does not exist, whatever happens next.
2. A chunk is garbage only if no live manifest references it *and* it is older
   than a grace period: a concurrent writer uploads chunks before it commits
   the manifest that references them.  Manifests are re-listed right before
   chunks go, so one committed meanwhile protects its chunks.
3. Garbage is either deleted (``cleanup="delete"``, batched) or marked for the
   bucket's lifecycle rule (``cleanup="lifecycle"``: one tagging request per
   chunk, no delete requests, removal done by the bucket).
"""

from __future__ import annotations

import datetime as _dt
import logging
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Literal

from . import run_index
from .errors import CloudCkptError, PermissionDenied, TransientError
from .format.manifest import Manifest
from .format.parts import PARTS_PREFIX
from .pointers import STATE_KEY, update_json
from .storage.base import ObjectInfo, Storage
from .storage.lifecycle import CHUNK_PREFIX

log = logging.getLogger(__name__)

Cleanup = Literal["delete", "lifecycle"]


def _utcnow() -> _dt.datetime:
    return _dt.datetime.now(_dt.timezone.utc)


@dataclass
class SweepReport:
    """What one sweep removed (or, in a dry run, would remove)."""

    checkpoints_removed: list[str] = field(default_factory=list)
    chunks_removed: int = 0
    bytes_removed: int = 0
    chunks_too_young: int = 0
    uploads_aborted: int = 0
    cleanup: str = "delete"
    dry_run: bool = False


@dataclass(frozen=True)
class SweepConfig:
    """How cleanup behaves.

    grace
        Unreferenced chunks younger than this are left alone (a writer may be
        about to commit them).  Must exceed the longest save you run.
    stale_upload_age
        Multipart uploads started longer ago than this are aborted.
    """

    cleanup: Cleanup = "delete"
    grace: _dt.timedelta = _dt.timedelta(hours=6)
    stale_upload_age: _dt.timedelta = _dt.timedelta(days=1)
    clock: Callable[[], _dt.datetime] = field(default=_utcnow, compare=False)

    def __post_init__(self) -> None:
        if self.cleanup not in ("delete", "lifecycle"):
            raise ValueError(f"cleanup must be 'delete' or 'lifecycle', got {self.cleanup!r}")
        for name in ("grace", "stale_upload_age"):
            value = getattr(self, name)
            if not isinstance(value, _dt.timedelta):
                raise TypeError(f"SweepConfig.{name} must be a datetime.timedelta (e.g. timedelta(hours=6)), "
                                f"got {type(value).__name__} {value!r}")
            if value < _dt.timedelta(0):
                raise ValueError(f"SweepConfig.{name} must not be negative, got {value}")
        if not callable(self.clock):
            raise TypeError("SweepConfig.clock must be a callable returning an aware datetime")


class Sweeper:
    """Removes checkpoints and garbage chunks from one root, by a :class:`SweepConfig`."""

    def __init__(self, store: Storage, config: SweepConfig | None = None) -> None:
        self.store = store
        self.config = config or SweepConfig()
        self._marked: set[str] = set()  # marked for lifecycle expiry by this process: not marked again
        self._uploads_unlistable = False  # listing unfinished uploads failed once: not tried again
        self._uploads_checked: _dt.datetime | None = None  # when unfinished uploads were last listed

    def remove_checkpoints(self, names: Iterable[str], report: SweepReport) -> None:
        """Delete the manifests ``names`` (the checkpoints cease to exist; their chunks become garbage)."""
        names = sorted(names)
        if names and not report.dry_run:
            self.store.delete(names)
        report.checkpoints_removed.extend(names)
        for name in names:
            log.info("%s %s/%s", "would remove" if report.dry_run else "removed", self.store.url, name)

    def sweep_chunks(
        self,
        live_chunks: Callable[[], set[str]],
        report: SweepReport,
        *,
        listed: list[ObjectInfo] | None = None,
        index_change: Callable[[dict[str, Any]], Any] | None = None,
    ) -> None:
        """Delete or mark chunks no live manifest references, once they have been garbage for the grace period.

        A chunk goes only if it was uploaded more than ``grace`` ago (a writer
        uploads chunks before it commits) *and* was first seen unreferenced more
        than ``grace`` ago (recorded in the run's index): a writer that decided
        to reuse a chunk of a checkpoint that retention then removed has until
        the grace period ends to commit, and its commit makes the chunk live
        again.  ``live_chunks`` is called after the chunk listing, so a manifest
        committed while we listed still protects its chunks.

        ``listed``: the objects under ``chunks/`` and ``parts/`` as the caller listed them (with
        the manifests ``live_chunks`` reads, in one listing; see :mod:`cloudckpt.root_listing`).
        ``index_change``: a change of the run index written along with the sweep's own.
        """
        now = self.config.clock()
        if listed is None:
            listed = self.store.list(CHUNK_PREFIX) + self.store.list(PARTS_PREFIX)  # parts: format/parts.py
        referenced = live_chunks()
        self._marked -= referenced  # re-uploaded since it was marked: a candidate again once unreferenced
        unreferenced = [i for i in listed if i.key not in referenced and i.key not in self._marked]
        since = self._unreferenced_since({i.key for i in unreferenced}, now, report.dry_run, index_change)
        garbage = []
        for info in unreferenced:
            uploaded = info.last_modified or since[info.key]
            if now - uploaded < self.config.grace or now - since[info.key] < self.config.grace:
                report.chunks_too_young += 1
            else:
                garbage.append(info)
        report.chunks_removed += len(garbage)
        report.bytes_removed += sum(i.size for i in garbage)
        if garbage and not report.dry_run:
            keys = [i.key for i in garbage]
            if self.config.cleanup == "delete":
                self.store.delete(keys)
            else:
                self.store.mark_expired(keys)
                self._marked.update(keys)
        if garbage:
            log.info("%s %d unreferenced chunks (%.1f MiB) under %s",
                     {"delete": "deleted", "lifecycle": "marked for expiry"}[self.config.cleanup]
                     if not report.dry_run else "would clean", len(garbage),
                     report.bytes_removed / 2**20, self.store.url)

    def _unreferenced_since(self, keys: set[str], now: _dt.datetime, dry_run: bool,
                            index_change: Callable[[dict[str, Any]], Any] | None = None) -> dict[str, _dt.datetime]:
        if self.config.grace <= _dt.timedelta(0):
            if index_change is not None and not dry_run:
                update_json(self.store, STATE_KEY, lambda body: (index_change(body), body)[1])
            return {key: now for key in keys}
        found: dict[str, _dt.datetime] = {}

        def change(body: dict[str, Any]) -> dict[str, Any] | None:
            found.clear()
            found.update(run_index.unreferenced_since(body, keys, now))
            if dry_run:
                return None
            if index_change is not None:
                index_change(body)
            return body

        update_json(self.store, STATE_KEY, change)
        return found

    def abort_stale_uploads(self, report: SweepReport, *, throttled: bool = False) -> None:
        """Abort uploads older than ``stale_upload_age`` (left by crashed writers), anywhere in the root.

        ``throttled`` (the prune after each save): list them only if this sweeper has not for a
        quarter of ``stale_upload_age``, so an upload is aborted within 1.25 times that age.
        """
        now = self.config.clock()
        if self._uploads_unlistable:
            return
        if (throttled and self._uploads_checked is not None
                and now - self._uploads_checked < self.config.stale_upload_age / 4):
            return
        try:
            pending_uploads = self.store.list_pending_uploads("")
        except TransientError:
            raise
        except CloudCkptError as exc:
            # An optional call: degrade once, with one warning, instead of failing every prune.
            self._uploads_unlistable = True
            hint = ("grant s3:ListBucketMultipartUploads and s3:AbortMultipartUpload"
                    if isinstance(exc, PermissionDenied) else "this store does not implement it")
            log.warning("cannot list unfinished multipart uploads of %s (%s); %s. Abandoned uploads are not "
                        "cleaned up by cloudckpt: use a bucket lifecycle rule for incomplete multipart uploads. "
                        "Not tried again by this process.", self.store.url, exc, hint)
            return
        if not report.dry_run:
            self._uploads_checked = now
        for pending in pending_uploads:
            if pending.initiated is not None and now - pending.initiated >= self.config.stale_upload_age:
                if not report.dry_run:
                    self.store.abort_pending_upload(pending)
                report.uploads_aborted += 1


def referenced_chunks(manifests: Iterable[Manifest], store: Storage | None = None) -> set[str]:
    """Keys the manifests need: their chunks and, for distributed checkpoints (read from ``store``),
    their parts and the chunks the parts list."""
    keys = set()
    for manifest in manifests:
        keys.update(chunk.key for chunk in manifest.chunks)
        if manifest.parts is not None:
            if store is None:
                raise ValueError(f"{manifest.name} lists parts: pass the store to read them")
            from .sharding.part import PartSource

            for part in PartSource(store, manifest).fetch(range(len(manifest.parts))):
                keys.add(manifest.parts[part.rank].key(manifest.name))
                keys.update(chunk.key for chunk in part.chunks)
    return keys
