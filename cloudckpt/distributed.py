"""Multi-process checkpoints with CheckpointManager semantics, resharded through torch.distributed.checkpoint.

    dist.init_process_group("gloo", timeout=datetime.timedelta(minutes=5))
    ckpt = DistributedCheckpointManager("s3://bucket/run", replicated=["progress"])
    ckpt.save({"model": fsdp_model, "optimizer": optimizer, "progress": progress}, step=100)  # every rank
    ckpt.restore({"model": fsdp_model, "optimizer": optimizer, "progress": progress})         # any world size

What is stored how (:mod:`cloudckpt.sharding.state`): an entry holding a
DTensor (FSDP2, tensor parallel), or named in ``replicated`` (the same on
every rank: a DDP model, counters), goes through DCP's planners (modules and
optimizers through ``get_model_state_dict``/``get_optimizer_state_dict``), so
it restores at any world size: DCP works out which stored block feeds which
destination shard.  Every other entry, and each rank's RNG state, is *per
rank*: it restores at the same world size only.

How a save goes (all ranks call it together):

1. Each rank plans its items with DCP's planner, keeps those it owns (its
   shards; a share of the replicated entries, chosen by name, the same way on
   every rank: no gather), uploads them as content-addressed chunks, then
   writes its *part* (what it stored, where) create-only under
   ``parts/<hh>/<checkpoint>/`` (:mod:`cloudckpt.format.parts`).
2. The ranks gather one small digest each to rank 0: the part's SHA-256, size
   and tensor bytes, or the rank's error.  A rank that fails still takes part.
3. Rank 0 commits one manifest that lists the parts (create-only) only if every
   rank succeeded, then moves ``latest``/``best`` and applies retention, as
   :class:`~cloudckpt.CheckpointManager` does.  It broadcasts the outcome; every
   rank returns the same :class:`~cloudckpt.CheckpointInfo` or raises
   :class:`DistributedCheckpointError` naming the ranks that failed.

So a failed rank means no manifest: the checkpoint does not exist, the previous
one stays ``latest``, and what was uploaded is garbage for the sweeper.  A rank
that *dies* cannot report; the others then fail when the process group's
timeout expires (``init_process_group(timeout=...)``).  The gather and the
manifest grow by one row per rank, whatever the number of tensors.

A single process reads such a checkpoint whole with ``CheckpointManager.load()``
(full tensors; per-rank state under ``"cloudckpt_ranks"``).  Checkpoints of
earlier releases (one manifest holding every rank's table) still restore, at
their own world size.
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
from .errors import CloudCkptError, CorruptCheckpoint, FormatVersionError, NotFound
from .format.manifest import ChunkRef, Manifest, check_manifest_name, parse_manifest
from .format.parts import PartRef
from .manager import CheckpointInfo, CheckpointManager, metric_value
from .pointers import is_pointer_key
from .restore import select
from .sharding.legacy import WorldSizeMismatch, restore_legacy
from .sharding.load import load_into
from .sharding.part import PartRequest, PartSource, write_part
from .sharding.planners import JsonSavePlanner, owned_items
from .sharding.state import classify, from_dcp, to_dcp
from .sharding.whole import CONFIG_KEY, RANKS_KEY
from .state import RNG_KEY, RNGState
from .storage import Storage
from .sweeper import SweepConfig
from .transfer import TransferConfig
from .writer import WriteStats, commit_manifest

__all__ = [
    "CONFIG_KEY", "RANKS_KEY", "DistributedCheckpointError", "DistributedCheckpointManager", "WorldSizeMismatch",
]

log = logging.getLogger(__name__)

_FALLBACK = (CorruptCheckpoint, FormatVersionError, NotFound)
_STAT_FIELDS = tuple(f.name for f in dataclasses.fields(WriteStats))


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


@dataclass
class _RankDigest:
    """What one rank sends rank 0: a few numbers about its part, or its error.  O(1) per rank."""

    error: str | None = None
    name: str = ""
    step: int = -1
    part: PartRef | None = None
    stats: WriteStats = field(default_factory=WriteStats)
    resharded: dict[str, str] = field(default_factory=dict)  # rank 0's only: key -> kind
    per_rank: list[str] = field(default_factory=list)

    def wire(self) -> tuple[Any, ...]:
        """Plain tuples: what crosses the gather (cheap to pickle and unpickle by the thousand)."""
        part = None if self.part is None else (self.part.sha256, self.part.size, self.part.nbytes)
        stats = tuple(getattr(self.stats, f) for f in _STAT_FIELDS)
        return self.error, self.name, self.step, part, stats, self.resharded, self.per_rank

    @classmethod
    def from_wire(cls, rank: int, wire: tuple[Any, ...]) -> _RankDigest:
        error, name, step, part, stats, resharded, per_rank = wire
        return cls(error, name, step, None if part is None else PartRef(rank, *part), WriteStats(*stats),
                   resharded, per_rank)


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
    """Collective save/restore of sharded and per-rank training state under one root, committed by rank 0.

    Every rank of ``process_group`` (the default group when None) builds one on
    the same root and calls :meth:`save` and :meth:`restore` together.
    Entries holding DTensors, and those named in ``replicated`` (identical on
    every rank), are resharded through DCP and restore at any world size;
    other entries are stored per rank.  The remaining arguments are
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
        self._reusable: tuple[str, dict[str, ChunkRef]] | None = None  # this rank's chunks of its last commit
        self.parts_read = 0  # parts fetched by the last restore (a measure of its cost)

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
        chunks: dict[str, ChunkRef] = {}
        try:
            digest, chunks = self._write_part(state, step, name, reason)
        except BaseException as exc:  # noqa: BLE001 (reported to rank 0; re-raised below)
            local_error = exc
            digest = _RankDigest(error=f"{type(exc).__name__}: {exc}")
        gathered = self._gather(digest.wire())
        outcome: _Outcome | None = None
        commit_error: BaseException | None = None
        if self.rank == 0:
            assert gathered is not None
            try:
                outcome = self._decide([_RankDigest.from_wire(r, w) for r, w in enumerate(gathered)],
                                       epoch, metrics, reason)
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
        self._reusable = (outcome.info.name, chunks)
        return outcome.info

    def _write_part(self, state: Mapping[str, Any], step: int, name: str | None,
                    reason: str) -> tuple[_RankDigest, dict[str, ChunkRef]]:
        if not isinstance(step, int) or isinstance(step, bool) or step < 0:
            raise ValueError(f"step must be a non-negative integer, got {step!r}")
        name = check_manifest_name(name or f"checkpoint_step_{step:08d}.ckpt")
        if is_pointer_key(name):
            raise ValueError(f"{name!r} is reserved for a pointer object; choose another checkpoint name")
        self._check_keys(state)
        resharded_keys, per_rank = classify(state, self.replicated)
        resharded = to_dcp(state, resharded_keys)
        planner = JsonSavePlanner()
        planner.set_up_planner(resharded.state_dict, is_coordinator=self.rank == 0)
        plan = planner.create_local_plan()
        items = owned_items(plan.items, planner.state_dict, self.rank, self.world_size, dist.get_rank())
        planner.finish_plan(dataclasses.replace(plan, items=items))
        own = {k: state[k] for k in per_rank}
        if self.capture_rng:
            own[RNG_KEY] = RNGState()
        written = write_part(self.store, PartRequest(
            checkpoint=name, step=step, reason=reason, rank=self.rank, world_size=self.world_size,
            items=items, planner=planner, own_state=own, allow_pickle=self.allow_pickle,
        ), self.transfer, self._known_chunks())
        digest = _RankDigest(name=name, step=step, part=written.ref, stats=written.stats,
                             resharded=resharded.kinds if self.rank == 0 else {},
                             per_rank=per_rank if self.rank == 0 else [])
        return digest, {c.key: c for c in written.chunks}

    def _check_keys(self, state: Mapping[str, Any]) -> None:
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

    def _known_chunks(self) -> dict[str, ChunkRef]:
        """This rank's chunks of its previous commit, if that checkpoint still exists (one HEAD): unchanged
        data is not uploaded again.  Retention never removes the latest checkpoint, and the sweeper waits a
        grace period before deleting chunks that became unreferenced."""
        if self._reusable is None:
            return {}
        name, chunks = self._reusable
        try:
            self.store.head(name)
        except NotFound:
            self._reusable = None
            return {}
        return chunks

    def _decide(self, gathered: list[_RankDigest], epoch: int | None, metrics: Mapping[str, float] | None,
                reason: str) -> _Outcome:
        failures = {r: u.error for r, u in enumerate(gathered) if u.error is not None}
        if failures:
            return _Outcome(failures)
        first = gathered[0]
        differ = {r: f"saves {u.name} (step {u.step}), rank 0 saves {first.name} (step {first.step})"
                  for r, u in enumerate(gathered) if (u.name, u.step) != (first.name, first.step)}
        if differ:
            return _Outcome(differ)
        parts = [u.part for u in gathered]
        assert all(p is not None for p in parts)
        manifest = Manifest(
            name=first.name, step=first.step, epoch=epoch, reason=reason,
            created=_dt.datetime.now(_dt.timezone.utc).isoformat().replace("+00:00", "Z"),
            state={}, tensors=[], chunks=[], parts=parts,  # type: ignore[arg-type]
            metrics={str(k): metric_value(k, v) for k, v in (metrics or {}).items()},
            compression=self.transfer.compression, library_version=__version__, host=socket.gethostname(),
            lineage=self.manager.prepare_lineage(),
            config={**self.manager.config, CONFIG_KEY: {
                "world_size": len(gathered), "replicated": list(self.replicated),
                "resharded": first.resharded, "per_rank": first.per_rank}},
        )
        commit_manifest(self.store, manifest)
        stats = WriteStats(*(sum(getattr(u.stats, f) for u in gathered) for f in _STAT_FIELDS))
        log.info("committed %s/%s from %d ranks: %d chunks uploaded, %d reused", self.store.url,
                 manifest.name, len(gathered), stats.chunks_uploaded, stats.chunks_reused)
        try:
            return _Outcome({}, self.manager.after_commit(manifest, stats))
        except Exception as exc:
            raise _AfterCommit(manifest.name) from exc

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
        The resharded entries (DTensors, ``replicated``) restore at any world size,
        each rank reading only the parts it needs (``parts_read`` says how many);
        per-rank entries need the saving world size (:class:`WorldSizeMismatch`),
        and the RNG state is restored only there.
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
            shared = self._broadcast(self._read_shared(name) if self.rank == 0 else None)
            try:
                info = self._restore_one(name, shared, state, map_location, keys)
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

    def _read_shared(self, name: str) -> tuple[bytes, bytes | None] | BaseException:
        """Rank 0 reads what every rank needs, the manifest and part 0 (which holds the plain values),
        and broadcasts it: N ranks restoring do not send N GETs to the same two keys."""
        try:
            data = self.store.get(name)
            manifest = parse_manifest(data, f"{self.store.url}/{name}")
            first = manifest.parts[0].key(name) if manifest.parts else None
            return data, None if first is None else self.store.get(first)
        except Exception as exc:  # noqa: BLE001 (raised on every rank by _restore_one)
            return exc

    def _restore_one(self, name: str, shared: tuple[bytes, bytes | None] | BaseException,
                     state: MutableMapping[str, Any], map_location: Any, keys: list[str] | None) -> CheckpointInfo:
        if isinstance(shared, BaseException):
            raise shared
        manifest = parse_manifest(shared[0], f"{self.store.url}/{name}")
        if manifest.name != name:
            raise CorruptCheckpoint(f"{self.store.url}/{name}: the manifest calls itself {manifest.name!r}")
        if manifest.parts is None:
            return restore_legacy(self.manager, manifest, state, rank=self.rank, world_size=self.world_size,
                                  map_location=map_location, keys=keys)
        where = f"{self.store.url}/{name}"
        described = manifest.config.get(CONFIG_KEY)
        if not isinstance(described, dict) or not isinstance(described.get("resharded"), dict):
            raise CorruptCheckpoint(f"{where}: the manifest lists parts but does not describe the distributed save")
        saved_resharded, saved_per_rank = described["resharded"], described.get("per_rank", [])
        chosen = list(select(state, keys, {**saved_resharded, **dict.fromkeys(saved_per_rank)}, where))
        source = PartSource(self.store, manifest, self.transfer.concurrency)
        source.add(0, shared[1] or b"")
        per_rank = [k for k in chosen if k in saved_per_rank]
        same_world = source.world_size == self.world_size
        if per_rank and not same_world:
            raise WorldSizeMismatch(
                f"{where}: {per_rank} were saved per rank by {source.world_size} ranks and cannot be restored by "
                f"{self.world_size}; restore the other entries with keys=[...], or save such entries as "
                "replicated (identical on every rank) or as DTensors, which reshard")
        resharded = to_dcp(state, [k for k in chosen if k in saved_resharded])
        self.parts_read = load_into(self.store, source, resharded.state_dict, rank=self.rank,
                                    world_size=self.world_size, transfer=self.transfer,
                                    fill={k for k, kind in resharded.kinds.items() if kind == "value"})
        from_dcp(state, resharded)
        if same_world and (per_rank or (keys is None and self.capture_rng)):
            own = source.fetch({self.rank})[0].own
            entries = {k: state[k] for k in per_rank}
            self.manager.restore_manifest(own, entries, map_location=map_location,
                                          keys=None if keys is None else per_rank)  # RNG only with the whole state
            state.update(entries)
        elif keys is None and self.capture_rng:
            log.info("%s: saved by %d ranks, restored by %d: random generators are not restored", where,
                     source.world_size, self.world_size)
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
