"""CheckpointManager: the one object that saves, lists, restores and prunes checkpoints of a run."""

from __future__ import annotations

import datetime as _dt
import json
import logging
import math
import os
import socket
import threading
from typing import Any, Callable, Literal, Mapping, MutableMapping, TypeVar

import torch

from . import __version__, run_index
from .catalog import UNUSABLE, Catalog, CheckpointInfo, Which
from .errors import CloudCkptError, CorruptCheckpoint, NotFound
from .format.manifest import ChunkRef, Manifest, check_manifest_name
from .format.serialize import StateDict, flatten, has_pickled_leaves, unflatten
from .pipeline import BackgroundSaver, SaveHandle
from .pointers import (
    LATEST_POINTER,
    STATE_KEY,
    Pointer,
    advance_latest,
    best_pointer_key,
    is_pointer_key,
    promote_best,
    update_json,
)
from .reader import ReadStats, read_tensors, verify_chunks
from .restore import apply_state, match_destinations, select
from .retention import RetentionContext, as_policy, best_first
from .snapshot import HostBufferPool, Snapshot
from .state import RNG_KEY, RNGState
from .storage import Storage, open_storage
from .sweeper import SweepConfig, Sweeper, SweepReport, referenced_chunks
from .transfer import TransferConfig
from .writer import WriteStats, host_copy, write_checkpoint

log = logging.getLogger(__name__)
T = TypeVar("T")

__all__ = ["CheckpointInfo", "CheckpointManager"]


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
        metrics = {str(k): metric_value(k, v) for k, v in (metrics or {}).items()}
        flat = flatten(self._with_rng(state), allow_pickle=self.allow_pickle)
        devices = [str(t.device) for t in flat.tensors]
        metadata = dict(
            step=step, epoch=epoch, reason=reason, metrics=metrics,
            created=_dt.datetime.now(_dt.timezone.utc).isoformat().replace("+00:00", "Z"),
            library_version=__version__, host=socket.gethostname(), config=self.config,
            pickled=self.allow_pickle and has_pickled_leaves(flat.tree),
        )
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
            manifest, stats = write_checkpoint(
                self.store, name=name, tree=tree, tensors=snapshot.tensors, metadata=metadata,
                transfer=self.transfer, known_chunks=self.known_chunks(), devices=devices,
            )
            return self.after_commit(manifest, stats)

    def after_commit(self, manifest: Manifest, stats: WriteStats | None = None) -> CheckpointInfo:
        """Everything that follows a commit: pointers, the run's index, retention.

        For writers that commit manifests themselves (e.g. ``cloudckpt.distributed``).
        """
        with self._lock:
            self.catalog.remember(manifest)
            pointers = self._move_pointers(manifest)
            if self.retention is not None:
                try:
                    self.prune()
                except CloudCkptError as exc:  # the checkpoint is committed; cleanup retries next time
                    log.error("retention after %s failed (it will be retried after the next save): %s",
                              manifest.name, exc)
        return CheckpointInfo.of(manifest, pointers, stats)

    def _with_rng(self, state: Mapping[str, Any]) -> dict[str, Any]:
        if not isinstance(state, Mapping):
            raise TypeError(f"state must be a mapping of names to values, got {type(state).__name__}")
        if RNG_KEY in state:
            raise ValueError(f"{RNG_KEY!r} is reserved for the RNG state cloudckpt captures")
        bad = [k for k in state if not isinstance(k, str) or k.startswith("__")]
        if bad:
            raise ValueError(f"state keys must be strings not starting with '__', got {bad!r}")
        return {**state, RNG_KEY: RNGState()} if self.capture_rng else dict(state)

    def known_chunks(self) -> dict[str, ChunkRef]:
        """Chunks of the checkpoints committed right now (listed afresh: another writer's
        retention may have removed a checkpoint since the last save)."""
        return {c.key: c for m in self.catalog.readable(self.catalog.names()) for c in m.chunks}

    def _move_pointers(self, manifest: Manifest) -> tuple[str, ...]:
        moved = []
        if advance_latest(self.store, Pointer(manifest.name, manifest.step)):
            moved.append(LATEST_POINTER)
        if self._promote_best(manifest):
            moved.append(best_pointer_key(self.monitor))
        update_json(self.store, STATE_KEY, lambda body: run_index.record(
            body, manifest, monitor=self.monitor, mode=self.mode, top_k=self.top_k))
        return tuple(moved)

    def _promote_best(self, manifest: Manifest) -> bool:
        if not self.monitor or not manifest.metrics:
            return False
        value = manifest.metrics.get(self.monitor)
        if self.monitor not in manifest.metrics:
            log.warning("metric %r missing from the metrics of %s; it cannot become the best",
                        self.monitor, manifest.name)
            return False
        if value is None or math.isnan(value):
            log.warning("metric %r of %s is NaN; it cannot become the best", self.monitor, manifest.name)
            return False
        # The best of everything committed, not just this checkpoint: a writer that died between
        # its commit and the pointer move left the pointer behind, and this repairs it.
        committed = [CheckpointInfo.of(m) for m in self.catalog.readable(self.catalog.names())]
        best = (best_first(committed, self.monitor, self.mode) or [CheckpointInfo.of(manifest)])[0]
        value = best.metrics[self.monitor]
        return promote_best(self.store, Pointer(best.name, best.step, self.monitor, value, self.mode))

    # -- listing ---------------------------------------------------------------
    def list(self) -> list[CheckpointInfo]:
        """Every committed checkpoint, oldest step first, with the pointers that name it."""
        self._check_open()
        return self.catalog.infos()

    def latest(self) -> CheckpointInfo | None:
        """The newest committed checkpoint whose manifest reads (where ``restore()`` starts), or None."""
        return self._first_readable("latest")

    def best(self) -> CheckpointInfo | None:
        """The best checkpoint by ``monitor`` whose manifest reads, or None."""
        return self._first_readable("best")

    def manifest(self, which: Which = "latest") -> Manifest:
        """The parsed manifest of a checkpoint (a name, ``"latest"``, ``"best"`` or a step)."""
        candidates = self._candidates(which)
        if not candidates:
            raise NotFound(f"{self.store.url}: no checkpoint")
        return self.catalog.manifest(candidates[0])

    def _first_readable(self, which: str) -> CheckpointInfo | None:
        for name in self._candidates(which):
            try:
                return CheckpointInfo.of(self.catalog.manifest(name))
            except UNUSABLE as exc:
                log.warning("skipping %s: %s", name, exc)
        return None

    def _candidates(self, which: Which) -> list[str]:
        return self.catalog.candidates(which, monitor=self.monitor, mode=self.mode)

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
        ``"latest"``/``"best"``, a checkpoint that fails verification is logged
        and the next one is tried (the newest, or the next best, that verifies).
        ``keys`` restores only those entries of ``state`` (e.g. ``["model"]``);
        RNG state is restored only when all of ``state`` is.
        """
        self._check_open()
        self.wait()
        found = self._first_that_works(
            which, lambda manifest: self.restore_manifest(manifest, state, map_location=map_location, keys=keys))
        return None if found is None else CheckpointInfo.of(found[0])

    def _first_that_works(self, which: Which, use: Callable[[Manifest], T]) -> tuple[Manifest, T] | None:
        """Apply ``use`` to the first candidate for ``which`` that reads and verifies (None if no
        checkpoint exists).  For "latest"/"best" a failing candidate is logged and the next one tried;
        a named checkpoint or step gets no fallback."""
        candidates = self._candidates(which)
        if not candidates:
            return None
        fallback = which in ("latest", "best")
        first_error: Exception | None = None
        for name in candidates:
            try:
                manifest = self.catalog.manifest(name)
                result = use(manifest)
            except UNUSABLE as exc:
                if isinstance(exc, NotFound) and not fallback:
                    raise NotFound(f"{self.store.url}/{name}: no such checkpoint") from exc
                log.warning("cannot use %s: %s", name, exc)
                first_error = first_error or exc
                if not fallback:
                    break
                continue
            if name != candidates[0]:
                log.warning("restored %s instead of %s", name, candidates[0])
            return manifest, result
        assert first_error is not None
        raise first_error

    def restore_manifest(self, manifest: Manifest, state: MutableMapping[str, Any], *,
                         map_location: str | torch.device | None = None, keys: list[str] | None = None) -> None:
        """Restore one parsed manifest into ``state`` in place, without fallback (see :meth:`restore`)."""
        saved_tree = manifest.state
        if not isinstance(saved_tree, dict):
            raise CorruptCheckpoint(f"{self.store.url}/{manifest.name}: state tree is not an object")
        where = f"{self.store.url}/{manifest.name}"
        if manifest.parts is not None:  # saved by DistributedCheckpointManager: read whole
            from .sharding.whole import load_whole_state

            whole = load_whole_state(self.store, manifest, self.transfer, keys=set(keys or state),
                                     allow_pickle=self.allow_pickle, map_location=map_location)
            apply_state(state, {k: whole[k] for k in select(state, keys, whole, where)})
            return
        chosen = select(state, keys, saved_tree, where)
        restore_rng = self.capture_rng and keys is None and RNG_KEY in saved_tree
        wanted_keys = set(chosen) | ({RNG_KEY} if restore_rng else set())
        subtree = _subtree(saved_tree, wanted_keys)
        live = flatten(chosen, allow_pickle=True)
        destinations = match_destinations(subtree, live.tree, live.tensors)
        if map_location is not None:
            destinations = {}
        indices = _tensor_indices(subtree)
        tensors, _ = read_tensors(self.store, manifest, destinations, self.transfer, only=indices)
        if map_location is not None:
            tensors = {i: t.to(map_location) for i, t in tensors.items()}
        table = [tensors.get(i, _ABSENT) for i in range(len(manifest.tensors))]
        loaded = self._unflatten(manifest, subtree, table)
        rng = loaded.pop(RNG_KEY, None)
        apply_state(state, {k: loaded[k] for k in chosen})
        if rng is not None:
            RNGState().load_state_dict(dict(rng))

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
        return _plain(holder), CheckpointInfo.of(manifest)

    def _load_manifest(self, manifest: Manifest, map_location: str | torch.device | None) -> dict[str, Any]:
        if not isinstance(manifest.state, dict):
            raise CorruptCheckpoint(f"{self.store.url}/{manifest.name}: state tree is not an object")
        if manifest.parts is not None:  # saved by DistributedCheckpointManager: read whole
            from .sharding.whole import load_whole_state

            return load_whole_state(self.store, manifest, self.transfer, allow_pickle=self.allow_pickle,
                                    map_location=map_location)
        tensors, _ = read_tensors(self.store, manifest, {}, self.transfer)
        if map_location is not None:
            tensors = {i: t.to(map_location) for i, t in tensors.items()}
        return self._unflatten(manifest, manifest.state, [tensors[i] for i in range(len(manifest.tensors))])

    def _unflatten(self, manifest: Manifest, tree: Any, tensors: list[torch.Tensor]) -> Any:
        try:
            return unflatten(tree, tensors, allow_pickle=self.allow_pickle)
        except CorruptCheckpoint as exc:
            raise CorruptCheckpoint(f"{self.store.url}/{manifest.name}: {exc}") from exc

    def verify(self, which: Which = "latest") -> ReadStats:
        """Re-read one checkpoint's manifest and every chunk, checking all checksums and hashes."""
        candidates = self._candidates(which)
        if not candidates:
            raise NotFound(f"{self.store.url}: no checkpoint to verify")
        self.catalog.forget({candidates[0]})
        manifest = self.catalog.manifest(candidates[0])
        if manifest.parts is not None:  # saved by DistributedCheckpointManager: the chunks its parts list
            from .sharding.whole import with_part_chunks

            manifest = with_part_chunks(self.store, manifest)
        return verify_chunks(self.store, manifest, self.transfer)

    # -- retention -------------------------------------------------------------
    def prune(self, *, dry_run: bool = False) -> SweepReport:
        """Apply the retention policy now: remove checkpoints it does not keep, then sweep garbage.

        Checkpoints named by a pointer (latest, best) or pinned are always kept.
        Without a retention policy nothing is removed, but garbage chunks
        (from failed saves) are still swept.  ``dry_run`` only reports.
        """
        self._check_open()
        report = SweepReport(cleanup=self.sweeper.config.cleanup, dry_run=dry_run)
        with self._lock:
            infos = self.list()
            protected = {i.name for i in infos if i.pointers} | self.pinned()
            policy = self.retention or as_policy(None)
            keep = policy(infos, RetentionContext(self.monitor, self.mode)) | protected
            doomed = {i.name for i in infos if i.name not in keep}
            self.sweeper.remove_checkpoints(doomed, report)
            if doomed and not dry_run:
                self.catalog.forget(doomed)
                update_json(self.store, STATE_KEY, lambda body: run_index.forget(body, doomed))
            try:
                self.sweeper.sweep_chunks(lambda: self._referenced(exclude=doomed), report)
            except _UnreadableManifest as exc:
                log.warning("chunks not swept: %s", exc)
            self.sweeper.abort_stale_uploads(report)
        return report

    def _referenced(self, exclude: set[str]) -> set[str]:
        manifests = []
        for name in self.catalog.names():
            if name in exclude:
                continue
            try:
                manifests.append(self.catalog.manifest(name))
            except UNUSABLE as exc:
                raise _UnreadableManifest(
                    f"{self.store.url}/{name} cannot be read ({exc}); its chunks cannot be told apart "
                    "from garbage, so nothing is deleted until it is repaired or removed"
                ) from exc
        return referenced_chunks(manifests, self.store)

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
            self.sweeper.remove_checkpoints([name], SweepReport(cleanup=self.sweeper.config.cleanup))
            self.catalog.forget({name})
            update_json(self.store, STATE_KEY, lambda body: run_index.forget(body, {name}))

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


_ABSENT: Any = torch.empty(0)


class _UnreadableManifest(CloudCkptError):
    pass


def metric_value(name: Any, value: Any) -> float | None:
    """A reported metric as a float (tensors and numpy scalars too); TypeError for anything else."""
    if value is None:
        return None
    if isinstance(value, torch.Tensor):
        value = value.item()
    try:
        return float(value)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"metric {name!r} must be a number, got {type(value).__name__}") from exc


def _subtree(tree: dict[str, Any], keys: set[str]) -> dict[str, Any]:
    return {k: v for k, v in tree.items() if k in keys}


def _tensor_indices(tree: Any) -> set[int]:
    found: set[int] = set()

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            index = node.get("__tensor__", node.get("__ndarray__"))
            if isinstance(index, int) and len(node) == 1:
                found.add(index)
                return
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(tree)
    return found


def _plain(value: Any) -> Any:
    if isinstance(value, StateDict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value
