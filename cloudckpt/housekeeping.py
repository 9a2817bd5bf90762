"""Retention and housekeeping of a run's root: prune, delete, pin.

:class:`Housekeeping` is the part of :class:`cloudckpt.CheckpointManager` that removes
checkpoints (by its retention policy, or one by one) and keeps what must stay (pointer targets,
pins); the sweep of the chunks nothing references any more is :mod:`cloudckpt.sweeper`.
"""

from __future__ import annotations

import datetime as _dt
import functools
import json
import logging
import threading
from typing import Any, Callable

from . import run_index
from .aside import SUPERSEDED_PREFIX, expired_superseded, supersede
from .catalog import UNUSABLE, Catalog
from .errors import CloudCkptError, NotFound
from .format.manifest import Manifest, check_manifest_name
from .pointers import STATE_KEY, update_json
from .resolver import Resolver, is_junk
from .format.parts import PARTS_PREFIX
from .retention import RetentionContext, as_policy, superseded_days
from .root_listing import RootListing
from .saving import AfterCommit
from .storage import Storage
from .storage.lifecycle import CHUNK_PREFIX
from .sweeper import Sweeper, SweepReport, referenced_chunks
from .timeline import LiveTimeline

log = logging.getLogger("cloudckpt.manager")


class Housekeeping:
    """Retention, deletion and pins; mixed into :class:`cloudckpt.CheckpointManager`."""

    store: Storage
    catalog: Catalog
    resolver: Resolver
    sweeper: Sweeper
    retention: Any
    monitor: str | None
    mode: str
    _lock: threading.RLock
    # Defined by CheckpointManager:
    _check_open: Callable[[], None]
    _open_for_writing: Callable[[], None]
    wait: Callable[..., None]

    def prune(self, *, dry_run: bool = False) -> SweepReport:
        """Apply the retention policy now: remove checkpoints it does not keep, then sweep garbage.

        Only live checkpoints count; the ones named by a pointer (latest, best) or pinned are
        always kept.  Superseded checkpoints go only by a ``KeepSuperseded(days=N)`` policy.
        Without a retention policy nothing is removed, but garbage chunks (from failed saves,
        and those only quarantined manifests used) are still swept.  ``dry_run`` only reports.
        """
        self._check_open()
        if not dry_run:
            self._open_for_writing()
        return self.prune_with(None, dry_run=dry_run)

    def prune_with(self, listing: RootListing | None, *, dry_run: bool = False, live: LiveTimeline | None = None,
                   seen: AfterCommit | None = None) -> SweepReport:
        """:meth:`prune` from one listing of the whole root: ``listing`` if given (a save's, plus
        its checkpoint), else one taken now.  ``live`` and ``seen``: the live timeline, pointers and
        pins the caller has just read (a save's steps after its commit), not read again."""
        report = SweepReport(cleanup=self.sweeper.config.cleanup, dry_run=dry_run)
        with self._lock:
            if listing is None or not listing.recursive:
                listing = RootListing.take(self.store, recursive=True)
            view = self.resolver.view(listing=listing, live=live, known_pointers=seen.pointers if seen else None)
            if not dry_run:
                for manifest in view.stragglers():  # left by a crash mid-fork or a zombie: finish the move
                    supersede(self.store, manifest.name, manifest.lineage.timeline, view.tokens.get(manifest.name))
            infos = view.infos()
            pins = seen.pins if seen is not None and seen.pins is not None else self.pinned()
            protected = {i.name for i in infos if i.pointers} | pins
            policy = self.retention or as_policy(None)
            keep = policy(infos, RetentionContext(self.monitor, self.mode)) | protected
            doomed = {i.name for i in infos if i.name not in keep}
            days = superseded_days(self.retention)
            if days is not None:
                doomed |= set(expired_superseded(listing.under(SUPERSEDED_PREFIX), _dt.timedelta(days=days),
                                                 self.sweeper.config.clock()))
            forget = self.remove(doomed, report, index=False)
            try:
                self.sweeper.sweep_chunks(lambda: self._referenced(doomed, listing), report,
                                          listed=listing.under(CHUNK_PREFIX) + listing.under(PARTS_PREFIX),
                                          index_change=forget)
                forget = None  # written with the sweep's own change of the index
            except _UnreadableManifest as exc:
                log.warning("chunks not swept: %s", exc)
            if forget is not None:
                update_json(self.store, STATE_KEY, forget)
            self.sweeper.abort_stale_uploads(report, throttled=seen is not None)
        return report

    def remove(self, keys: set[str], report: SweepReport, *, index: bool = True
               ) -> Callable[[dict[str, Any]], dict[str, Any]] | None:
        """Delete the manifests ``keys`` (live names or ``superseded/`` keys) and forget them.

        With ``index=False`` the run index is not updated: the change it needs is returned (None
        if none), for the caller to write along with its own.
        """
        self.sweeper.remove_checkpoints(keys, report)
        if not keys or report.dry_run:
            return None
        self.catalog.forget(keys)
        names = {k for k in keys if "/" not in k}
        if not names:
            return None
        change = functools.partial(run_index.forget, names=names)
        if index:
            update_json(self.store, STATE_KEY, change)
            return None
        return change

    def _referenced(self, exclude: set[str], listing: RootListing) -> set[str]:
        """The chunks the manifests of ``listing`` (but ``exclude``) reference.

        A manifest gone since the listing was deleted, quarantined, or moved (under
        ``superseded/``, or back from there; copied first, then deleted): then the root is listed
        again, so a moved one still protects its chunks.
        """
        keys = self.catalog.names(listing) + self.catalog.superseded_keys(listing)
        manifests, gone = self._readable_manifests(keys, exclude)
        if gone:
            again = [k for k in self.catalog.names() + self.catalog.superseded_keys() if k not in keys]
            manifests += self._readable_manifests(again, exclude)[0]
        return referenced_chunks(manifests, self.store)

    def _readable_manifests(self, keys: list[str], exclude: set[str]) -> tuple[list[Manifest], bool]:
        manifests, gone = [], False
        for key in keys:
            if key in exclude:
                continue
            try:
                manifests.append(self.catalog.manifest(key))
            except NotFound:
                gone = True
            except UNUSABLE as exc:
                if "/" not in key and is_junk(self.store, key):
                    continue  # not a manifest: it references nothing
                raise _UnreadableManifest(
                    f"{self.store.url}/{key} cannot be read ({exc}); its chunks cannot be told apart "
                    "from garbage, so nothing is deleted until it is quarantined "
                    f"(`cloudckpt verify {self.store.url} --all --repair`) or removed"
                ) from exc
        return manifests, gone

    def delete(self, name: str) -> None:
        """Remove one checkpoint now: its manifest goes (the checkpoint ceases to exist); its chunks
        are swept later, once no other checkpoint uses them.  A pointer naming it is left to dangle
        (readers fall back to the newest checkpoint that exists)."""
        self._check_open()
        self._open_for_writing()
        self.wait()
        name = check_manifest_name(name)
        with self._lock:
            named_by = [k for k, p in self.catalog.pointers().items() if p.target == name]
            if named_by:
                log.warning("deleting %s, which %s names", name, " and ".join(named_by))
            self.remove({name}, SweepReport(cleanup=self.sweeper.config.cleanup))

    def pinned(self) -> set[str]:
        """Checkpoints pinned with :meth:`pin`; retention keeps them."""
        try:
            body = json.loads(self.store.get(STATE_KEY))
        except (NotFound, ValueError, RecursionError):
            return set()
        return run_index.pins(body) if isinstance(body, dict) else set()

    def pin(self, name: str, pinned: bool = True) -> None:
        """Pin (or, with ``pinned=False``, unpin) a checkpoint so that retention never removes it."""
        self._open_for_writing()
        if pinned:
            self.catalog.manifest(check_manifest_name(name))  # only existing checkpoints can be pinned
        update_json(self.store, STATE_KEY, lambda body: run_index.set_pin(body, name, pinned))


class _UnreadableManifest(CloudCkptError):
    pass
