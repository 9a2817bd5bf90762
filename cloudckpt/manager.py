"""CheckpointManager: the one object that saves, lists, restores and prunes checkpoints of a run."""

from __future__ import annotations

import datetime as _dt
import json
import logging
import os
import threading
from typing import Any, Callable, Literal, Mapping, MutableMapping, TypeVar

import torch

from . import run_index
from .aside import expired_superseded, quarantine, set_aside_unreadable, supersede
from .branching import Position, RollbackReport, apply_fork, commit, plan, rollback
from .catalog import UNUSABLE, Catalog, CheckpointInfo
from .errors import CloudCkptError, CorruptCheckpoint, NotFound
from .format.manifest import ChunkRef, Lineage, Manifest, check_manifest_name
from .format.serialize import flatten
from .loading import load_state, plain, restore_manifest
from .pipeline import BackgroundSaver, SaveHandle
from .pointers import STATE_KEY, is_pointer_key, update_json
from .reader import ReadStats, verify_chunks
from .resolver import Resolver, Which, is_junk
from .retention import RetentionContext, as_policy, superseded_days
from .saving import checkpoint_metadata, metric_value, move_pointers, with_rng
from .snapshot import HostBufferPool, Snapshot
from .state import RNG_KEY, RNGState
from .storage import Storage, open_storage
from .sweeper import SweepConfig, Sweeper, SweepReport, referenced_chunks
from .timeline import read_live
from .transfer import TransferConfig
from .writer import WriteStats, host_copy, upload_tensors

log = logging.getLogger(__name__)
T = TypeVar("T")

__all__ = ["CheckpointInfo", "CheckpointManager", "RollbackReport", "metric_value"]


class CheckpointManager:
    """Saves and restores the complete training state under one root (``s3://``, ``gs://``, a path...).

    >>> mgr = CheckpointManager("memory://", monitor="val_loss", mode="min")
    >>> model = torch.nn.Linear(2, 2)
    >>> mgr.save({"model": model}, step=10, metrics={"val_loss": 0.5}).name
    'checkpoint_step_00000010.ckpt'
    >>> mgr.restore({"model": model}).step
    10
    """

    def __init__(
        self,
        root: str | os.PathLike[str] | Storage,
        *,
        monitor: str | None = None,
        mode: Literal["min", "max"] = "min",
        retention: Any = None,
        async_save: bool = False,
        storage_options: Mapping[str, Any] | None = None,
        transfer: TransferConfig | None = None,
        capture_rng: bool = True,
        allow_pickle: bool = False,
        config: Mapping[str, Any] | None = None,
        top_k: int = 10,
        cleanup: SweepConfig | None = None,
    ) -> None:
        if mode not in ("min", "max"):
            raise ValueError(f"mode must be 'min' or 'max', got {mode!r}")
        if isinstance(root, Storage):
            if storage_options:
                raise TypeError("storage_options apply only when root is a URL or path")
            self.store = root
        else:
            self.store = open_storage(root, **dict(storage_options or {}))
        self.monitor = monitor
        self.mode = mode
        self.retention = None if retention is None else as_policy(retention)
        self.sweeper = Sweeper(self.store, cleanup)
        self.async_save = async_save
        self.transfer = transfer or TransferConfig()
        self.capture_rng = capture_rng
        self.allow_pickle = allow_pickle
        self.config = dict(config or {})
        self.top_k = top_k
        self.catalog = Catalog(self.store)
        self.resolver = Resolver(self.store, self.catalog)
        self._position = Position()
        self._reported: set[str] = set()  # junk objects already reported
        self._lock = threading.RLock()
        self._closed = False
        self._saver = BackgroundSaver() if async_save else None
        self._pool = HostBufferPool()

    # -- saving ----------------------------------------------------------------
    def save(
        self,
        state: Mapping[str, Any],
        step: int,
        epoch: int | None = None,
        metrics: Mapping[str, float] | None = None,
        *,
        reason: str = "manual",
        name: str | None = None,
    ) -> CheckpointInfo | SaveHandle[CheckpointInfo]:
        """Commit a checkpoint of ``state``; return its info once it is durable.

        With ``async_save`` the call returns once the state is copied to host
        memory, with a :class:`SaveHandle` whose ``result()`` is the info; the
        upload and commit run in the background (one at a time), and a failure
        is raised by the next ``save()``, ``wait()`` or ``close()``.

        ``name`` defaults to ``checkpoint_step_{step:08d}.ckpt``.  The latest
        pointer moves to it (unless a later step is already there) and, when
        ``monitor`` is in ``metrics`` and beats the best so far, the best pointer.
        """
        self._check_open()
        if not isinstance(step, int) or isinstance(step, bool) or step < 0:
            raise ValueError(f"step must be a non-negative integer, got {step!r}")
        name = check_manifest_name(name or f"checkpoint_step_{step:08d}.ckpt")
        if is_pointer_key(name):
            raise ValueError(f"{name!r} is reserved for a pointer object; choose another checkpoint name")
        flat = flatten(with_rng(state, self.capture_rng), allow_pickle=self.allow_pickle)
        devices = [str(t.device) for t in flat.tensors]
        metadata = checkpoint_metadata(step=step, epoch=epoch, reason=reason, metrics=metrics or {},
                                       config=self.config, tree=flat.tree, allow_pickle=self.allow_pickle)
        if self._saver is None:
            snapshot = Snapshot([host_copy(t) for t in flat.tensors], 0)
            return self._commit(name, flat.tree, snapshot, devices, metadata)
        self._saver.wait()  # back-pressure: the previous save must release the host buffer first
        snapshot = self._pool.snapshot(flat.tensors)
        return self._saver.submit(name, lambda: self._commit(name, flat.tree, snapshot, devices, metadata))

    def _commit(self, name: str, tree: Any, snapshot: Snapshot, devices: list[str],
                metadata: dict[str, Any]) -> CheckpointInfo:
        snapshot.wait_ready()
        with self._lock:
            todo = plan(self.resolver.view(pointers=False), self._position)
            known = {c.key: c for m in todo.view.manifests.values() for c in m.chunks}
            uploaded = upload_tensors(self.store, snapshot.tensors, self.transfer, known, devices)
            lineage = apply_fork(self.store, todo) if todo.fork_point is not None else todo.lineage
            manifest, token = commit(self.store, Manifest(
                name=name, tensors=uploaded.tensors, chunks=uploaded.chunks, compression=self.transfer.compression,
                state=tree, lineage=lineage, **metadata))
            stats = uploaded.stats
            log.info("committed %s/%s on timeline %s: %d chunks uploaded (%.1f MiB), %d reused (%.1f MiB)",
                     self.store.url, name, manifest.lineage.timeline, stats.chunks_uploaded,
                     stats.bytes_uploaded / 2**20, stats.chunks_reused, stats.bytes_reused / 2**20)
            live = [m for m in todo.view.live_manifests() if m.name != manifest.name] + [manifest]
            return self.after_commit(manifest, stats, token=token, live=live)

    def prepare_lineage(self) -> Lineage:
        """The lineage of the next checkpoint this manager commits, forking a new timeline first if the
        restored checkpoint is not the newest of the live one.  For writers that commit manifests
        themselves (e.g. ``cloudckpt.distributed``), right before their commit."""
        with self._lock:
            todo = plan(self.resolver.view(pointers=False), self._position)
            return apply_fork(self.store, todo) if todo.fork_point is not None else todo.lineage

    def after_commit(self, manifest: Manifest, stats: WriteStats | None = None, *,
                     token: str | None = None, live: list[Manifest] | None = None) -> CheckpointInfo:
        """Everything that follows a commit: pointers, the run's index, retention.

        For writers that commit manifests themselves (e.g. ``cloudckpt.distributed``).  A checkpoint
        whose timeline was abandoned while it was being written moves no pointer: it is superseded.
        """
        with self._lock:
            self.catalog.remember(manifest, token)
            self._position = Position.saved(manifest)
            if not read_live(self.store).is_live(manifest):
                log.warning("%s/%s was committed, but its timeline %s was abandoned meanwhile (a rollback); it "
                            "is superseded and moves no pointer", self.store.url, manifest.name,
                            manifest.lineage.timeline)
                supersede(self.store, manifest.name, manifest.lineage.timeline, token)
                return CheckpointInfo.of(manifest, (), stats, superseded=True)
            pointers = self._move_pointers(manifest, live)
            if self.retention is not None:
                try:
                    self.prune()
                except CloudCkptError as exc:  # the checkpoint is committed; cleanup retries next time
                    log.error("retention after %s failed (it will be retried after the next save): %s",
                              manifest.name, exc)
        return CheckpointInfo.of(manifest, pointers, stats)

    def known_chunks(self) -> dict[str, ChunkRef]:
        """Chunks of the checkpoints committed right now (listed afresh: another writer's
        retention may have removed a checkpoint since the last save)."""
        return {c.key: c for m in self.catalog.readable(self.catalog.names()) for c in m.chunks}

    def _move_pointers(self, manifest: Manifest, live: list[Manifest] | None) -> tuple[str, ...]:
        # ``live``: the save's own listing plus its checkpoint, instead of listing again
        def listed() -> list[Manifest]:
            return self.resolver.view(pointers=False).live_manifests()

        return move_pointers(self.store, manifest, (lambda: live) if live is not None else listed,
                             monitor=self.monitor, mode=self.mode, top_k=self.top_k, live_now=listed)

    # -- timelines -------------------------------------------------------------
    def rollback(self, to: Which, *, dry_run: bool = False) -> RollbackReport:
        """Make checkpoint ``to`` (a name or a step) the resume point of the run.

        A new timeline starts at ``to``: every live checkpoint after it is *superseded* (kept
        under ``superseded/``, never ``latest`` or ``best``, its name free again), ``latest``
        points at ``to`` and each best pointer at the best live checkpoint.  Writers still
        running on the old timeline can no longer save.  Then ``restore(state)`` resumes from
        ``to``.  ``dry_run`` only reports what would be superseded.
        """
        self._check_open()
        self.wait()
        with self._lock:
            view = self.resolver.view()
            target = self.catalog.manifest(self.resolver.resolve(to, monitor=self.monitor, mode=self.mode))
            report = rollback(self.store, view, target, dry_run=dry_run,
                              live=lambda: self.resolver.view(pointers=False).live_manifests())
            if dry_run:
                return report
            self._position = Position(report.timeline, target.name, target.step, target.lineage.timeline, True)
            return report

    def quarantine(self, name: str, reason: str = "quarantined by hand") -> str | None:
        """Move the top-level object ``name`` (a damaged manifest, or junk) under ``quarantine/`` with
        ``reason``: restore skips it, its name is free, and the chunks only it used become garbage.
        Returns its new key (None if it was already gone)."""
        self._check_open()
        if is_pointer_key(name):
            raise ValueError(f"{name!r} is a pointer, not a checkpoint")
        with self._lock:
            self.catalog.forget({name})
            return quarantine(self.store, check_manifest_name(name), reason)

    # -- listing ---------------------------------------------------------------
    def list(self, *, superseded: bool = False) -> list[CheckpointInfo]:
        """Every live checkpoint, oldest step first, with the pointers that name it.

        With ``superseded``, the superseded ones too (``info.superseded``), which ``latest``,
        ``best`` and retention never count.
        """
        self._check_open()
        view = self.resolver.view(superseded=superseded)
        infos = view.infos()
        if superseded:
            infos += [view.info(m, superseded=True) for m in view.stragglers() + list(view.superseded.values())]
        return sorted(infos, key=lambda i: (i.step, i.created))

    def latest(self) -> CheckpointInfo | None:
        """The newest live checkpoint whose manifest reads (where ``restore()`` starts), or None."""
        return self._first_readable("latest")

    def best(self) -> CheckpointInfo | None:
        """The best live checkpoint by ``monitor`` whose manifest reads, or None."""
        return self._first_readable("best")

    def manifest(self, which: Which = "latest") -> Manifest:
        """The parsed manifest of a checkpoint (a name, ``"latest"``, ``"best"`` or a step)."""
        candidates = self.candidates(which)
        if not candidates:
            raise NotFound(f"{self.store.url}: no checkpoint")
        return self.catalog.manifest(candidates[0])

    def candidates(self, which: Which = "latest") -> list[str]:
        """The keys to try for ``which``, preferred first (see :mod:`cloudckpt.resolver` for the rule)."""
        return self.resolver.candidates(which, monitor=self.monitor, mode=self.mode)

    def _first_readable(self, which: str) -> CheckpointInfo | None:
        for key in self.candidates(which):
            try:
                return CheckpointInfo.of(self.catalog.manifest(key))
            except UNUSABLE as exc:
                log.warning("skipping %s: %s", key, exc)
        return None

    # -- restoring -------------------------------------------------------------
    def restore(
        self,
        state: MutableMapping[str, Any],
        which: Which = "latest",
        *,
        map_location: str | torch.device | None = None,
        keys: list[str] | None = None,
    ) -> CheckpointInfo | None:
        """Load a checkpoint into ``state`` in place; None when the root holds no checkpoint.

        ``which`` is ``"latest"``, ``"best"``, a checkpoint name or a step.  For
        ``"latest"``/``"best"``, a checkpoint that fails verification is quarantined
        (moved aside with the reason, logged once) and the next one is tried.
        ``keys`` restores only those entries of ``state`` (e.g. ``["model"]``);
        RNG state is restored only when all of ``state`` is.  The next save continues
        from this checkpoint: on a new timeline if it is not the newest live one.
        """
        self._check_open()
        self.wait()
        found = self._first_that_works(
            which, lambda manifest: self.restore_manifest(manifest, state, map_location=map_location, keys=keys))
        return None if found is None else CheckpointInfo.of(found[0])

    def _first_that_works(self, which: Which, use: Callable[[Manifest], T]) -> tuple[Manifest, T] | None:
        """Apply ``use`` to the first candidate for ``which`` that reads and verifies (None if no
        checkpoint exists).  For "latest"/"best" a damaged candidate is quarantined and the next one
        tried; a named checkpoint or step gets no fallback."""
        fallback = which in ("latest", "best")
        set_aside, skipped = self._set_aside_unreadable() if fallback else (None, [])
        first_error: Exception | None = None
        candidates = self.candidates(which)
        for key in candidates:
            try:
                manifest = self.catalog.manifest(key)
                result = use(manifest)
            except UNUSABLE as exc:
                if isinstance(exc, NotFound) and not fallback:
                    raise NotFound(f"{self.store.url}/{key}: no such checkpoint") from exc
                if not fallback:
                    raise
                first_error = first_error or exc
                skipped.append(key)
                if isinstance(exc, CorruptCheckpoint) and "/" not in key:
                    self.quarantine(key, str(exc))
                else:
                    log.warning("cannot use %s: %s", key, exc)
                continue
            if skipped:
                log.warning("restored %s instead of %s", key, ", ".join(skipped))
            self._position = Position.restored_from(manifest)
            return manifest, result
        if first_error or set_aside:
            raise first_error or set_aside  # fail closed: something is there, and nothing restores
        return None

    def _set_aside_unreadable(self) -> tuple[Exception | None, list[str]]:
        problems = self.resolver.view(pointers=False).problems
        with self._lock:
            self.catalog.forget(set(problems))
            return set_aside_unreadable(self.store, problems, self._reported)

    def restore_manifest(self, manifest: Manifest, state: MutableMapping[str, Any], *,
                         map_location: str | torch.device | None = None, keys: list[str] | None = None) -> None:
        """Restore one parsed manifest into ``state`` in place, without fallback (see :meth:`restore`)."""
        restore_manifest(self.store, manifest, state, transfer=self.transfer, capture_rng=self.capture_rng,
                         allow_pickle=self.allow_pickle, map_location=map_location, keys=keys)
        self._position = Position.restored_from(manifest)

    def load(self, which: Which = "latest", *, map_location: str | torch.device | None = None,
             restore_rng: bool = False) -> tuple[dict[str, Any], CheckpointInfo]:
        """Read a checkpoint into new objects (state dicts as plain dicts), without live targets.

        Falls back like :meth:`restore`.  With ``restore_rng`` the process's random
        generators are set from the checkpoint too.
        """
        self._check_open()
        self.wait()
        found = self._first_that_works(which, lambda manifest: self._load_manifest(manifest, map_location))
        if found is None:
            raise NotFound(f"{self.store.url}: no checkpoint to load")
        manifest, holder = found
        rng = holder.pop(RNG_KEY, None)
        if restore_rng and rng is not None:
            RNGState().load_state_dict(dict(rng))
        return plain(holder), CheckpointInfo.of(manifest)

    def _load_manifest(self, manifest: Manifest, map_location: str | torch.device | None) -> dict[str, Any]:
        return load_state(self.store, manifest, transfer=self.transfer, allow_pickle=self.allow_pickle,
                          map_location=map_location)

    def verify(self, which: Which = "latest") -> ReadStats:
        """Re-read one checkpoint's manifest and every chunk, checking all checksums and hashes."""
        candidates = self.candidates(which)
        if not candidates:
            raise NotFound(f"{self.store.url}: no checkpoint to verify")
        self.catalog.forget({candidates[0]})
        return verify_chunks(self.store, self.catalog.manifest(candidates[0]), self.transfer)

    # -- retention -------------------------------------------------------------
    def prune(self, *, dry_run: bool = False) -> SweepReport:
        """Apply the retention policy now: remove checkpoints it does not keep, then sweep garbage.

        Only live checkpoints count; the ones named by a pointer (latest, best) or pinned are
        always kept.  Superseded checkpoints go only by a ``KeepSuperseded(days=N)`` policy.
        Without a retention policy nothing is removed, but garbage chunks (from failed saves,
        and those only quarantined manifests used) are still swept.  ``dry_run`` only reports.
        """
        self._check_open()
        report = SweepReport(cleanup=self.sweeper.config.cleanup, dry_run=dry_run)
        with self._lock:
            view = self.resolver.view()
            if not dry_run:
                for manifest in view.stragglers():  # left by a crash mid-fork or a zombie: finish the move
                    supersede(self.store, manifest.name, manifest.lineage.timeline, view.tokens.get(manifest.name))
            infos = view.infos()
            protected = {i.name for i in infos if i.pointers} | self.pinned()
            policy = self.retention or as_policy(None)
            keep = policy(infos, RetentionContext(self.monitor, self.mode)) | protected
            doomed = {i.name for i in infos if i.name not in keep}
            days = superseded_days(self.retention)
            if days is not None:
                doomed |= set(expired_superseded(self.store, _dt.timedelta(days=days), self.sweeper.config.clock()))
            self.remove(doomed, report)
            try:
                self.sweeper.sweep_chunks(lambda: self._referenced(exclude=doomed), report)
            except _UnreadableManifest as exc:
                log.warning("chunks not swept: %s", exc)
            self.sweeper.abort_stale_uploads(report)
        return report

    def remove(self, keys: set[str], report: SweepReport) -> None:
        """Delete the manifests ``keys`` (live names or ``superseded/`` keys) and forget them."""
        self.sweeper.remove_checkpoints(keys, report)
        if keys and not report.dry_run:
            self.catalog.forget(keys)
            names = {k for k in keys if "/" not in k}
            if names:
                update_json(self.store, STATE_KEY, lambda body: run_index.forget(body, names))

    def _referenced(self, exclude: set[str]) -> set[str]:
        manifests = []
        for key in self.catalog.names() + self.catalog.superseded_keys():
            if key in exclude:
                continue
            try:
                manifests.append(self.catalog.manifest(key))
            except UNUSABLE as exc:
                if "/" not in key and is_junk(self.store, key):
                    continue  # not a manifest: it references nothing
                raise _UnreadableManifest(
                    f"{self.store.url}/{key} cannot be read ({exc}); its chunks cannot be told apart "
                    "from garbage, so nothing is deleted until it is quarantined "
                    f"(`cloudckpt verify {self.store.url} --all --repair`) or removed"
                ) from exc
        return referenced_chunks(manifests)

    def delete(self, name: str) -> None:
        """Remove one checkpoint now: its manifest goes (the checkpoint ceases to exist); its chunks
        are swept later, once no other checkpoint uses them.  A pointer naming it is left to dangle
        (readers fall back to the newest checkpoint that exists)."""
        self._check_open()
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
        if pinned:
            self.catalog.manifest(check_manifest_name(name))  # only existing checkpoints can be pinned
        update_json(self.store, STATE_KEY, lambda body: run_index.set_pin(body, name, pinned))

    # -- lifecycle -------------------------------------------------------------
    def wait(self, timeout: float | None = None) -> None:
        """Block until every save so far is committed; raise the error of one that failed.

        With ``timeout``, raise TimeoutError if the save in flight is not done by then.
        """
        if self._saver is not None:
            self._saver.wait(timeout)

    @property
    def saving(self) -> bool:
        """Whether an async save is still uploading in the background."""
        return self._saver is not None and self._saver.busy

    def close(self) -> None:
        """Finish pending work (raising its error, if any) and release the store's connections."""
        if self._closed:
            return
        try:
            self.wait()
        finally:
            self._closed = True
            self.store.close()

    def _check_open(self) -> None:
        if self._closed:
            raise CloudCkptError("this CheckpointManager is closed; create a new one")

    def __enter__(self) -> "CheckpointManager":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"CheckpointManager({self.store.url!r})"


class _UnreadableManifest(CloudCkptError):
    pass
