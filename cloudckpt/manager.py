"""CheckpointManager: the one object that saves, lists, restores and prunes checkpoints of a run."""

from __future__ import annotations

import dataclasses
import logging
import os
import threading
from typing import Any, Callable, Literal, Mapping, MutableMapping, TypeVar

import torch

from .aside import quarantine, set_aside_unreadable, supersede
from .branching import Position, RollbackReport, apply_fork, commit, plan, rollback
from .catalog import UNUSABLE, Catalog, CheckpointInfo
from .errors import CloudCkptError, CorruptCheckpoint, NotFound
from .format.manifest import ChunkRef, Lineage, Manifest, check_manifest_name
from .format.serialize import flatten
from .housekeeping import Housekeeping
from .loading import load_state, plain
from .pipeline import BackgroundSaver, SaveHandle
from .restore import apply_state, select
from .post_commit import check_manager_config, report_failure, run_after_commit
from .pointers import is_pointer_key
from .reader import ReadStats, verify_chunks
from .resolver import Resolver, Which
from .retention import as_policy
from .root_listing import RootListing
from .saving import AfterCommit, checkpoint_metadata, metric_value, pointer_steps, with_rng
from .snapshot import HostBufferPool, Snapshot
from .state import RNG_KEY, RNGState
from .storage import ObjectInfo, Storage, open_storage
from .storage.capabilities import check_option, check_writable
from .sweeper import SweepConfig, Sweeper
from .timeline import read_live
from .transaction import restore_checkpoint
from .transfer import TransferConfig
from .writer import WriteStats, host_copy, upload_tensors

log = logging.getLogger(__name__)
T = TypeVar("T")

__all__ = ["CheckpointInfo", "CheckpointManager", "RollbackReport", "metric_value"]


class CheckpointManager(Housekeeping):
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
        retention = None if retention is None else as_policy(retention)
        check_manager_config(monitor=monitor, mode=mode, retention=retention, cleanup=cleanup,
                             transfer=transfer, top_k=top_k)
        options = dict(storage_options or {})
        self._conditional_writes = check_option(options.pop("conditional_writes", None) or "required")
        if isinstance(root, Storage):
            if options:
                raise TypeError("storage_options other than conditional_writes apply only when root is a URL or path")
            self.store = root
        else:
            self.store = open_storage(root, **options)
        self.monitor = monitor
        self.mode = mode
        self.retention = retention
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
        self._probed = False
        self._saver = BackgroundSaver(self._explain_abandoned) if async_save else None
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
        self._open_for_writing()
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
            # The save's one listing of the root: whole when retention follows the commit (its
            # sweep needs the chunks), its top level otherwise.  See cloudckpt/root_listing.py.
            listing = RootListing.take(self.store, recursive=self.retention is not None)
            todo = plan(self.resolver.view(pointers=False, listing=listing), self._position)
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
            # A fork moved manifests since the listing, and a token-less commit (the same checkpoint
            # saved again) cannot be told from another object of its name: list again for those.
            after = (listing.with_object(ObjectInfo(manifest.name, 0, token))
                     if todo.fork_point is None and token is not None else None)
            return self.after_commit(manifest, stats, token=token, live=live, listing=after)

    def prepare_lineage(self) -> Lineage:
        """The lineage of the next checkpoint this manager commits, forking a new timeline first if the
        restored checkpoint is not the newest of the live one.  For writers that commit manifests
        themselves (e.g. ``cloudckpt.distributed``), right before their commit."""
        with self._lock:
            todo = plan(self.resolver.view(pointers=False), self._position)
            return apply_fork(self.store, todo) if todo.fork_point is not None else todo.lineage

    def after_commit(self, manifest: Manifest, stats: WriteStats | None = None, *,
                     token: str | None = None, live: list[Manifest] | None = None,
                     listing: RootListing | None = None) -> CheckpointInfo:
        """Everything that follows a commit: pointers, the run's index, retention.

        For writers that commit manifests themselves (e.g. ``cloudckpt.distributed``).  A checkpoint
        whose timeline was abandoned while it was being written moves no pointer: it is superseded.
        Never raises for a failure of these steps: the checkpoint is committed.  Failures are logged
        and listed in the returned info's ``problems``; the next save runs them again.
        ``live`` and ``listing``: the save's own listing of the root (plus its checkpoint), used
        instead of listing again.
        """
        self._open_for_writing()
        moved: list[str] = []
        with self._lock:
            self.catalog.remember(manifest, token)
            self._position = Position.saved(manifest)
            try:
                record = read_live(self.store)  # afresh: a fork while this save uploaded supersedes it
                is_live = record.is_live(manifest)
            except Exception as exc:  # the checkpoint is committed: report, do not fail the save
                problem = report_failure(manifest.name, "reading the live timeline", exc)
                return dataclasses.replace(CheckpointInfo.of(manifest, (), stats), problems=(problem,))
            if not is_live:
                log.warning("%s/%s was committed, but its timeline %s was abandoned meanwhile (a rollback); it "
                            "is superseded and moves no pointer", self.store.url, manifest.name,
                            manifest.lineage.timeline)
                supersede(self.store, manifest.name, manifest.lineage.timeline, token)
                return CheckpointInfo.of(manifest, (), stats, superseded=True)
            listed = self._live_manifests
            # ``live``: the save's own listing plus its checkpoint, instead of listing again
            seen = AfterCommit()
            steps = pointer_steps(self.store, manifest, (lambda: live) if live is not None else listed,
                                  monitor=self.monitor, mode=self.mode, top_k=self.top_k, moved=moved,
                                  live_now=listed, seen=seen)
            if self.retention is not None:
                steps.append(("retention", lambda: self.prune_with(listing, live=record, seen=seen)))
            problems = run_after_commit(manifest.name, steps)
        return dataclasses.replace(CheckpointInfo.of(manifest, tuple(moved), stats), problems=problems)

    def _live_manifests(self) -> list[Manifest]:
        return self.resolver.view(pointers=False).live_manifests()

    def known_chunks(self) -> dict[str, ChunkRef]:
        """Chunks of the checkpoints committed right now (listed afresh: another writer's
        retention may have removed a checkpoint since the last save)."""
        return {c.key: c for m in self.catalog.readable(self.catalog.names()) for c in m.chunks}

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
        if not dry_run:
            self._open_for_writing()
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
        self._open_for_writing()
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
        """Restore one parsed manifest into ``state`` in place, without fallback (see :meth:`restore`).

        All or nothing: a failure leaves every object of ``state`` and the RNG as they were
        (see :mod:`cloudckpt.transaction`).
        """
        if manifest.parts is not None:  # saved by DistributedCheckpointManager: read whole, then apply
            from .sharding.whole import load_whole_state

            where = f"{self.store.url}/{manifest.name}"
            whole = load_whole_state(self.store, manifest, self.transfer, keys=set(keys or state),
                                     allow_pickle=self.allow_pickle, map_location=map_location)
            apply_state(state, {k: whole[k] for k in select(state, keys, whole, where)})
        else:
            restore_checkpoint(self.store, manifest, state, self.transfer, keys=keys, map_location=map_location,
                               restore_rng=self.capture_rng, allow_pickle=self.allow_pickle)
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
        if manifest.parts is not None:  # saved by DistributedCheckpointManager: read whole
            from .sharding.whole import load_whole_state

            return load_whole_state(self.store, manifest, self.transfer, allow_pickle=self.allow_pickle,
                                    map_location=map_location)
        return load_state(self.store, manifest, transfer=self.transfer, allow_pickle=self.allow_pickle,
                          map_location=map_location)

    def verify(self, which: Which = "latest") -> ReadStats:
        """Re-read one checkpoint's manifest and every chunk, checking all checksums and hashes."""
        candidates = self.candidates(which)
        if not candidates:
            raise NotFound(f"{self.store.url}: no checkpoint to verify")
        self.catalog.forget({candidates[0]})
        manifest = self.catalog.manifest(candidates[0])
        if manifest.parts is not None:  # saved by DistributedCheckpointManager: the chunks its parts list
            from .sharding.whole import with_part_chunks

            manifest = with_part_chunks(self.store, manifest)
        return verify_chunks(self.store, manifest, self.transfer)

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

    def _explain_abandoned(self, name: str) -> str:
        return (f"nothing was committed ({self.store.url}/{name} does not exist; earlier checkpoints are "
                f"untouched). Chunks it had already uploaded are orphaned under {self.store.url}/chunks/; "
                f"prune() or `cloudckpt gc` removes them once they are older than the grace period "
                f"(SweepConfig.grace, {self.sweeper.config.grace}).")

    def _open_for_writing(self) -> None:
        """Probe the store before the first write (once per process and store; see capabilities.py)."""
        if not self._probed:
            check_writable(self.store, self._conditional_writes)
            self._probed = True

    def _check_open(self) -> None:
        if self._closed:
            raise CloudCkptError("this CheckpointManager is closed; create a new one")

    def __enter__(self) -> "CheckpointManager":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"CheckpointManager({self.store.url!r})"

