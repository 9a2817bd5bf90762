"""Multi-process checkpoints with CheckpointManager semantics: every rank uploads, rank 0 commits.

    dist.init_process_group("gloo", timeout=datetime.timedelta(minutes=5))
    ckpt = DistributedCheckpointManager("s3://bucket/run", replicated=["model"])
    ckpt.save({"model": ddp.module, "optimizer": zero_shard_optimizer}, step=100)   # on every rank
    ckpt.restore({"model": ddp.module, "optimizer": zero_shard_optimizer})           # on every rank

How a save goes (all ranks call it together):

1. Each rank flattens its own state (and, on rank 0 only, the ``replicated``
   keys: entries every rank holds identically, like a DDP model, stored once),
   copies its tensors to host memory and uploads them as content-addressed
   chunks; chunks that live checkpoints already hold are skipped.
2. The ranks gather their results to rank 0: the state tree, tensor entries and
   chunk refs on success, the error on failure.  A rank that fails still takes
   part, so nobody waits for it.
3. Rank 0 writes one ordinary cloudckpt manifest (create-only) only if every
   rank succeeded, then moves ``latest``/``best`` pointers and applies retention,
   exactly as :class:`~cloudckpt.CheckpointManager` does.  It broadcasts the
   outcome; every rank returns the same :class:`~cloudckpt.CheckpointInfo` or
   raises :class:`DistributedCheckpointError` naming the ranks that failed.

So a failed rank means no manifest: the checkpoint does not exist, the previous
one stays ``latest``, and the uploaded chunks are garbage for the sweeper.  A
rank that *dies* (rather than raising) cannot report; the others then fail when
the process group's timeout expires (``init_process_group(timeout=...)``).

The manifest is a regular one: the replicated entries sit at the top of the
state tree (so a single-process ``CheckpointManager`` restores ``model`` from it),
the per-rank entries in a list under ``"cloudckpt_ranks"`` (index = rank, each
with that rank's RNG state), and ``config["cloudckpt_distributed"]`` records the
world size.  Restoring needs the same world size; to change it (resharding),
use :mod:`cloudckpt.integrations.dcp` instead.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import logging
import os
import socket
from collections.abc import Iterable, Mapping, MutableMapping
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.distributed as dist

from . import __version__
from .errors import (
    CloudCkptError,
    CorruptCheckpoint,
    FormatVersionError,
    NotFound,
)
from .format.manifest import ChunkRef, Manifest, TensorEntry, check_manifest_name
from .format.serialize import Segment, flatten, has_pickled_leaves
from .manager import CheckpointInfo, CheckpointManager, metric_value
from .pointers import is_pointer_key
from .reader import load_manifest
from .state import RNG_KEY, RNGState
from .storage import Storage
from .sweeper import SweepConfig
from .transfer import TransferConfig
from .writer import WriteStats, commit_manifest, host_copy, upload_tensors

__all__ = [
    "CONFIG_KEY", "RANKS_KEY", "DistributedCheckpointError", "DistributedCheckpointManager", "WorldSizeMismatch",
]

log = logging.getLogger(__name__)

#: Top-level key of the manifest's state tree holding the per-rank trees (a list, index = rank).
RANKS_KEY = "cloudckpt_ranks"
#: Key of the manifest's ``config`` describing the distributed save.
CONFIG_KEY = "cloudckpt_distributed"
_FALLBACK = (CorruptCheckpoint, FormatVersionError, NotFound)


class DistributedCheckpointError(CloudCkptError):
    """A collective save or restore failed; ``failures`` maps each failed rank to its error message."""

    def __init__(self, message: str, failures: Mapping[int, str]) -> None:
        detail = "; ".join(f"rank {r}: {m}" for r, m in sorted(failures.items()))
        super().__init__(f"{message} ({detail})" if detail else message)
        self.failures = dict(failures)

    def __reduce__(self):
        return (_rebuild_error, (self.args[0], self.failures))


def _rebuild_error(text: str, failures: dict[int, str]) -> DistributedCheckpointError:
    error = DistributedCheckpointError("", {})
    error.args, error.failures = (text,), failures
    return error


class WorldSizeMismatch(CloudCkptError):
    """The checkpoint was saved by a different number of ranks than are restoring it."""


@dataclass
class _RankUpload:
    """What one rank sends rank 0 after uploading: its part of the manifest, or its error."""

    error: str | None = None
    name: str = ""
    step: int = -1
    tree: Any = None
    tensors: list[TensorEntry] = field(default_factory=list)
    chunks: list[ChunkRef] = field(default_factory=list)
    pickled: bool = False
    stats: WriteStats = field(default_factory=WriteStats)


@dataclass
class _Outcome:
    failures: dict[int, str]
    info: CheckpointInfo | None = None
    committed: str | None = None  # set when the manifest was written but what follows it failed


class _AfterCommit(Exception):
    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.name = name


class DistributedCheckpointManager:
    """Collective save/restore of per-rank training state under one root, committed by rank 0.

    Every rank of ``process_group`` (the default group when None) builds one on
    the same root and calls :meth:`save` and :meth:`restore` together.
    ``replicated`` names state keys that hold the same value on every rank (a
    DDP model): rank 0 stores them once, every rank restores them.  Other
    keys are stored per rank.  The remaining arguments are
    :class:`~cloudckpt.CheckpointManager`'s; pointers and retention are run by
    rank 0.  ``root`` may be a Storage object (each rank passes its own).
    """

    def __init__(
        self,
        root: str | os.PathLike[str] | Storage,
        *,
        process_group: dist.ProcessGroup | None = None,
        replicated: Iterable[str] = (),
        monitor: str | None = None,
        mode: Literal["min", "max"] = "min",
        retention: Any = None,
        storage_options: Mapping[str, Any] | None = None,
        transfer: TransferConfig | None = None,
        capture_rng: bool = True,
        allow_pickle: bool = False,
        config: Mapping[str, Any] | None = None,
        top_k: int = 10,
        cleanup: SweepConfig | None = None,
    ) -> None:
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError("DistributedCheckpointManager needs torch.distributed to be initialized "
                               "(dist.init_process_group); for one process use CheckpointManager")
        self.group = process_group
        self.rank = dist.get_rank(process_group)
        self.world_size = dist.get_world_size(process_group)
        self.replicated = tuple(dict.fromkeys(replicated))
        self.capture_rng = capture_rng
        self.allow_pickle = allow_pickle
        self.manager = CheckpointManager(
            root, monitor=monitor, mode=mode, retention=retention if self.rank == 0 else None,
            storage_options=storage_options, transfer=transfer, capture_rng=capture_rng,
            allow_pickle=allow_pickle, config=config, top_k=top_k, cleanup=cleanup,
        )
        self.store = self.manager.store
        self.transfer = self.manager.transfer

    # -- collectives -------------------------------------------------------------
    def _gather(self, obj: Any) -> list[Any] | None:
        out: list[Any] | None = [None] * self.world_size if self.rank == 0 else None
        dist.gather_object(obj, out, group=self.group, group_dst=0)
        return out

    def _broadcast(self, obj: Any) -> Any:
        box = [obj]
        dist.broadcast_object_list(box, group=self.group, group_src=0)
        return box[0]

    def _all_gather(self, obj: Any) -> list[Any]:
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj, group=self.group)
        return out

    # -- saving ------------------------------------------------------------------
    def save(
        self,
        state: Mapping[str, Any],
        step: int,
        epoch: int | None = None,
        metrics: Mapping[str, float] | None = None,
        *,
        reason: str = "manual",
        name: str | None = None,
    ) -> CheckpointInfo:
        """Save every rank's ``state`` as one checkpoint; all ranks call it with the same step and name.

        Returns the committed checkpoint's info on every rank, or raises
        :class:`DistributedCheckpointError` on every rank when any rank failed
        (then nothing was committed).  ``epoch``, ``metrics`` and ``reason`` are
        taken from rank 0.
        """
        local_error: BaseException | None = None
        try:
            upload = self._upload(state, step, name)
        except BaseException as exc:  # noqa: BLE001 (reported to rank 0; re-raised below)
            local_error = exc
            upload = _RankUpload(error=f"{type(exc).__name__}: {exc}")
        gathered = self._gather(upload)
        outcome: _Outcome | None = None
        commit_error: BaseException | None = None
        if self.rank == 0:
            assert gathered is not None
            try:
                outcome = self._decide(gathered, epoch, metrics, reason)
            except _AfterCommit as exc:
                commit_error = exc.__cause__
                outcome = _Outcome({0: f"pointers/retention failed: {type(commit_error).__name__}: {commit_error}"},
                                   committed=exc.name)
            except BaseException as exc:  # noqa: BLE001
                commit_error = exc
                outcome = _Outcome({0: f"commit failed: {type(exc).__name__}: {exc}"})
        outcome = self._broadcast(outcome)
        for error in (local_error, commit_error):
            if error is not None and not isinstance(error, Exception):
                raise error  # a crash stand-in or an interrupt: after the collectives, as it is
        if outcome.failures:
            what = (f"{self.store.url}/{outcome.committed} was committed, but then" if outcome.committed
                    else f"{self.store.url}: distributed save of step {step} was not committed")
            raise DistributedCheckpointError(what, outcome.failures) from (local_error or commit_error)
        assert outcome.info is not None
        return outcome.info

    def _upload(self, state: Mapping[str, Any], step: int, name: str | None) -> _RankUpload:
        if not isinstance(step, int) or isinstance(step, bool) or step < 0:
            raise ValueError(f"step must be a non-negative integer, got {step!r}")
        name = check_manifest_name(name or f"checkpoint_step_{step:08d}.ckpt")
        if is_pointer_key(name):
            raise ValueError(f"{name!r} is reserved for a pointer object; choose another checkpoint name")
        own, shared = self._split(state)
        flat = flatten({"own": own, "shared": shared}, allow_pickle=self.allow_pickle)
        uploaded = upload_tensors(self.store, [host_copy(t) for t in flat.tensors], self.transfer,
                                  self.manager.known_chunks(), devices=[str(t.device) for t in flat.tensors])
        entries, chunks = uploaded.tensors, uploaded.chunks
        return _RankUpload(name=name, step=step, tree=flat.tree, tensors=entries, chunks=chunks,
                           pickled=self.allow_pickle and has_pickled_leaves(flat.tree), stats=uploaded.stats)

    def _split(self, state: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
        if not isinstance(state, Mapping):
            raise TypeError(f"state must be a mapping of names to values, got {type(state).__name__}")
        bad = [k for k in state if not isinstance(k, str) or k.startswith("__")]
        if bad:
            raise ValueError(f"state keys must be strings not starting with '__', got {bad!r}")
        for reserved in (RNG_KEY, RANKS_KEY):
            if reserved in state:
                raise ValueError(f"{reserved!r} is reserved by cloudckpt; rename that state entry")
        missing = [k for k in self.replicated if k not in state]
        if missing:
            raise ValueError(f"replicated keys {missing} are not in the state passed to save()")
        own = {k: v for k, v in state.items() if k not in self.replicated}
        if self.capture_rng:
            own[RNG_KEY] = RNGState()
        shared = {k: state[k] for k in self.replicated} if self.rank == 0 else {}
        return own, shared

    def _decide(self, gathered: list[_RankUpload], epoch: int | None, metrics: Mapping[str, float] | None,
                reason: str) -> _Outcome:
        failures = {r: u.error for r, u in enumerate(gathered) if u.error is not None}
        if failures:
            return _Outcome(failures)
        first = gathered[0]
        differ = {r: f"saves {u.name} (step {u.step}), rank 0 saves {first.name} (step {first.step})"
                  for r, u in enumerate(gathered) if (u.name, u.step) != (first.name, first.step)}
        if differ:
            return _Outcome(differ)
        manifest = dataclasses.replace(self._merge(gathered, epoch, metrics, reason),
                                       lineage=self.manager.prepare_lineage())
        commit_manifest(self.store, manifest)
        stats = WriteStats()
        for u in gathered:
            for f in dataclasses.fields(WriteStats):
                setattr(stats, f.name, getattr(stats, f.name) + getattr(u.stats, f.name))
        log.info("committed %s/%s from %d ranks: %d chunks uploaded, %d reused", self.store.url,
                 manifest.name, len(gathered), stats.chunks_uploaded, stats.chunks_reused)
        try:
            return _Outcome({}, self.manager.after_commit(manifest, stats))
        except Exception as exc:
            raise _AfterCommit(manifest.name) from exc

    def _merge(self, gathered: list[_RankUpload], epoch: int | None, metrics: Mapping[str, float] | None,
               reason: str) -> Manifest:
        chunks: list[ChunkRef] = []
        position: dict[str, int] = {}
        tensors: list[TensorEntry] = []
        rank_trees = []
        shared: dict[str, Any] = {}
        for rank, upload in enumerate(gathered):
            remap = [position.setdefault(c.key, len(position)) for c in upload.chunks]
            for c, p in zip(upload.chunks, remap):
                if p == len(chunks):
                    chunks.append(c)
            offset = len(tensors)
            tensors.extend(dataclasses.replace(e, segments=tuple(
                Segment(remap[s.chunk_index], s.chunk_offset, s.tensor_offset, s.length) for s in e.segments))
                for e in upload.tensors)
            tree = _shift_tensors(upload.tree, offset)
            rank_trees.append(tree["own"])
            if rank == 0:
                shared = tree["shared"]
        return Manifest(
            name=gathered[0].name, step=gathered[0].step, epoch=epoch, reason=reason,
            created=_dt.datetime.now(_dt.timezone.utc).isoformat().replace("+00:00", "Z"),
            state={**shared, RANKS_KEY: rank_trees}, tensors=tensors, chunks=chunks,
            metrics={str(k): metric_value(k, v) for k, v in (metrics or {}).items()},
            compression=self.transfer.compression, library_version=__version__, host=socket.gethostname(),
            config={**self.manager.config, CONFIG_KEY: {"world_size": len(gathered),
                                                        "replicated": list(self.replicated)}},
            pickled=any(u.pickled for u in gathered),
        )

    # -- restoring ---------------------------------------------------------------
    def restore(
        self,
        state: MutableMapping[str, Any],
        which: str | int = "latest",
        *,
        map_location: str | torch.device | None = None,
        keys: list[str] | None = None,
    ) -> CheckpointInfo | None:
        """Restore every rank's ``state`` in place from one checkpoint; all ranks call it together.

        Rank 0 chooses the checkpoint (``"latest"``, ``"best"``, a name or a step)
        and every rank restores its own entries and the replicated ones from it.
        For ``"latest"``/``"best"``, when a rank finds that checkpoint damaged,
        *all* ranks move on to the next one, so they never resume from different
        steps.  Returns None on every rank when the root holds no checkpoint.
        """
        candidates: list[str] | None = None
        error: BaseException | None = None
        if self.rank == 0:
            try:
                candidates = self.manager.candidates(which)
            except BaseException as exc:  # noqa: BLE001
                error = exc if isinstance(exc, CloudCkptError) else DistributedCheckpointError(
                    f"{self.store.url}: cannot choose a checkpoint: {type(exc).__name__}: {exc}", {0: repr(exc)})
        candidates, error = self._broadcast((candidates, error))
        if error is not None:
            raise error
        if not candidates:
            return None
        tried: dict[int, str] = {}
        for name in candidates:
            info, local_error = None, None
            try:
                info = self._restore_one(name, state, map_location, keys)
            except BaseException as exc:  # noqa: BLE001
                local_error = exc
            report = None if local_error is None else (f"{type(local_error).__name__}: {local_error}",
                                                       isinstance(local_error, _FALLBACK))
            reports = self._all_gather(report)
            if local_error is not None and not isinstance(local_error, Exception):
                raise local_error
            failures = {r: rep[0] for r, rep in enumerate(reports) if rep is not None}
            if not failures:
                if name != candidates[0]:
                    log.warning("restored %s instead of %s", name, candidates[0])
                assert info is not None
                return info
            fallback = which in ("latest", "best") and all(rep[1] for rep in reports if rep is not None)
            if not fallback:
                raise DistributedCheckpointError(f"{self.store.url}/{name}: distributed restore failed",
                                                 failures) from local_error
            log.warning("cannot restore %s on every rank: %s", name, failures)
            tried.update({r: f"{name}: {m}" for r, m in failures.items() if r not in tried})
        raise DistributedCheckpointError(f"{self.store.url}: no checkpoint could be restored on every rank", tried)

    def _restore_one(self, name: str, state: MutableMapping[str, Any], map_location: Any,
                     keys: list[str] | None) -> CheckpointInfo:
        manifest = load_manifest(self.store, name)
        where = f"{self.store.url}/{name}"
        described = manifest.config.get(CONFIG_KEY)
        saved = manifest.state
        if not isinstance(described, dict) or not isinstance(saved, dict) or not isinstance(saved.get(RANKS_KEY), list):
            raise WorldSizeMismatch(f"{where} was not saved by DistributedCheckpointManager; restore it with "
                                    "CheckpointManager")
        ranks = saved[RANKS_KEY]
        if described.get("world_size") != self.world_size or len(ranks) != self.world_size:
            raise WorldSizeMismatch(
                f"{where} was saved by {len(ranks)} ranks and is being restored by {self.world_size}; a "
                "per-rank checkpoint restores only at the same world size (use cloudckpt.integrations.dcp "
                "for resharding)")
        own = ranks[self.rank]
        if not isinstance(own, dict):
            raise CorruptCheckpoint(f"{where}: the state of rank {self.rank} is not an object")
        view = {k: v for k, v in saved.items() if k != RANKS_KEY}
        view.update(own)
        self.manager.restore_manifest(dataclasses.replace(manifest, state=view), state,
                                      map_location=map_location, keys=keys)
        return CheckpointInfo.of(manifest)

    # -- reading -----------------------------------------------------------------
    def list(self) -> list[CheckpointInfo]:
        """Every committed checkpoint (this rank's view of the store; no collective)."""
        return self.manager.list()

    def latest(self) -> CheckpointInfo | None:
        return self.manager.latest()

    def close(self) -> None:
        self.manager.close()

    def __enter__(self) -> DistributedCheckpointManager:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"DistributedCheckpointManager({self.store.url!r}, rank={self.rank}/{self.world_size})"


def _shift_tensors(tree: Any, offset: int) -> Any:
    """``tree`` with every ``{"__tensor__": i}`` / ``{"__ndarray__": i}`` reference moved by ``offset``."""
    if isinstance(tree, dict):
        if len(tree) == 1:
            (tag, value), = tree.items()
            if tag in ("__tensor__", "__ndarray__") and type(value) is int:
                return {tag: value + offset}
        return {k: _shift_tensors(v, offset) for k, v in tree.items()}
    if isinstance(tree, list):
        return [_shift_tensors(v, offset) for v in tree]
    return tree




