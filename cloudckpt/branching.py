"""Which timeline a save goes on, forking when it must, and committing a name that may be taken.

A manager remembers its :class:`Position`: the checkpoint its state continues (restored, rolled
back to, or last saved) and the timeline it writes on.  At each save :func:`plan` compares it
with the root:

* a fresh manager (nothing restored or saved yet) appends to the live timeline;
* a manager continuing its own saves appends, unless its timeline is no longer live: then it
  is a zombie of an abandoned timeline and the save is refused (:class:`TimelineSuperseded`);
* a manager that restored a checkpoint appends if that checkpoint is live and the newest of
  the live timeline; otherwise the save *forks* a new timeline from it, and every live
  checkpoint after the fork point is superseded (kept under ``superseded/``).

The fork happens in this order, so no reader ever sees a half state: (1) the timeline record
changes by compare-and-swap (from here on the abandoned checkpoints are not live, wherever they
are stored); (2) their manifests move under ``superseded/`` (their names are free); (3) the new
manifest is committed create-only.  A crash after (1) or (2) leaves a root that resolves to the
fork point; whoever saves or prunes next finishes the moves.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from typing import Callable

from .aside import quarantine, supersede, superseded_key
from .catalog import CheckpointInfo
from .errors import (
    AlreadyExists,
    CheckpointExists,
    CorruptCheckpoint,
    FormatVersionError,
    LostRace,
    NotFound,
    TimelineSuperseded,
)
from .format.manifest import Lineage, Manifest
from .pointers import LATEST_POINTER, Pointer, force_pointer
from .reader import load_manifest
from .resolver import RootView, is_junk, junk_advice
from .retention import best_first
from .storage.base import Storage
from .timeline import ForkPoint, LiveTimeline, describe_fork, fork, forked, read_live
from .writer import commit_manifest

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Position:
    """Where a manager's state comes from.  ``restored``: from a restore or rollback, not its own save."""

    timeline: str | None = None
    parent: str | None = None
    parent_step: int = 0
    parent_timeline: str | None = None
    restored: bool = False

    @classmethod
    def restored_from(cls, manifest: Manifest) -> "Position":
        return cls(None, manifest.name, manifest.step, manifest.lineage.timeline, True)

    @classmethod
    def saved(cls, manifest: Manifest) -> "Position":
        return cls(manifest.lineage.timeline, manifest.name, manifest.step, manifest.lineage.timeline, False)


@dataclass
class Plan:
    """What a save will do: the lineage its manifest records, and the fork it needs first (if any)."""

    lineage: Lineage
    view: RootView
    fork_point: ForkPoint | None = None
    abandoned: list[Manifest] | None = None
    new_record: LiveTimeline | None = None


def plan(view: RootView, position: Position) -> Plan:
    """Decide where a save goes (reads nothing: ``view`` is the root as just listed)."""
    live = view.live
    if position.parent is None and position.timeline is None:
        return Plan(Lineage(live.timeline, None), view)
    if not position.restored:
        if position.timeline != live.timeline:
            raise TimelineSuperseded(
                f"{view.url}: this writer's timeline {position.timeline} was abandoned for {live.timeline} "
                f"(a rollback, or a restore and save by another process) after it saved {position.parent}; "
                "its saves would never be latest, so they are refused. Restore the checkpoint to continue "
                "from (mgr.restore(state)) and save again")
        return Plan(Lineage(live.timeline, position.parent), view)
    live_manifests = view.live_manifests()
    parent_live = any(m.name == position.parent and m.lineage.timeline == position.parent_timeline
                      for m in live_manifests)
    newer = [m for m in live_manifests if m.step > position.parent_step and m.name != position.parent]
    if parent_live and not newer:
        return Plan(Lineage(live.timeline, position.parent), view)
    point = ForkPoint(position.parent, position.parent_step, position.parent_timeline, parent_live)
    return fork_plan(view, point)


def fork_plan(view: RootView, point: ForkPoint) -> Plan:
    """The plan of forking a new timeline at ``point`` (the new id is chosen when it is applied)."""
    seen = {m.lineage.timeline for m in view.manifests.values()}
    draft = forked(view.live, point, "t-draft", seen, [])
    abandoned = [m for m in view.live_manifests() if not draft.covers(m.lineage.timeline, m.step)]
    return Plan(Lineage(draft.timeline, point.name), view, point, abandoned)


def apply_fork(store: Storage, todo: Plan) -> Lineage:
    """Make the planned timeline live (compare-and-swap), log the one WARNING, free the abandoned names."""
    assert todo.fork_point is not None and todo.abandoned is not None
    seen = {m.lineage.timeline for m in todo.view.manifests.values()}
    record = fork(store, todo.fork_point, seen, [m.name for m in todo.abandoned], todo.view.live)
    todo.new_record = record
    log.warning("%s: %s", store.url, describe_fork(todo.fork_point, todo.abandoned))
    point = todo.fork_point
    if not point.live and point.name is not None and point.timeline is not None:
        _bring_back(store, point.name, point.timeline)
    if point.name is not None:
        # Before anything is moved aside: a crash from here on leaves latest.ckpt naming a live
        # checkpoint (the fork point), never one that has just left the top of the root.
        force_pointer(store, LATEST_POINTER, Pointer(point.name, point.step))
    for manifest in todo.abandoned + todo.view.stragglers():
        supersede(store, manifest.name, manifest.lineage.timeline, todo.view.tokens.get(manifest.name))
    return replace(todo.lineage, timeline=record.timeline)


def _bring_back(store: Storage, name: str, timeline: str) -> None:
    """Move a superseded fork point back to the top of the root, where the new record makes it live."""
    key = superseded_key(timeline, name)
    try:
        data = store.get(key)
    except NotFound:
        return  # it was not superseded (or is already back)
    try:
        store.put(name, data, mode="create")
    except AlreadyExists:
        existing = _taken_by(store, name)
        if existing is not None and existing.lineage.timeline != timeline:
            supersede(store, name, existing.lineage.timeline)
            store.put(name, data, mode="create")
    store.delete([key])
    log.info("moved %s/%s back from %s: the new timeline continues it", store.url, name, key)


def commit(store: Storage, manifest: Manifest) -> tuple[Manifest, str | None]:
    """Commit ``manifest`` create-only; when its name is taken, settle why.

    A superseded manifest is moved aside and a damaged one quarantined, then the commit is
    retried.  A live one holding the same state means this save already happened: the stored
    manifest is returned (a no-op).  A live one holding another state is :class:`CheckpointExists`.
    Returns the committed manifest and its store token (None when not known).
    """
    for _ in range(4):
        try:
            return manifest, commit_manifest(store, manifest).token
        except LostRace:
            raise  # single-writer mode: another writer replaced our manifest; nothing to settle
        except AlreadyExists:
            existing = _taken_by(store, manifest.name)
        if existing is None:
            continue
        if not read_live(store).is_live(existing):
            supersede(store, existing.name, existing.lineage.timeline)
            continue
        if same_checkpoint(existing, manifest):
            log.info("%s/%s is already saved with this state; nothing to do", store.url, manifest.name)
            return existing, None
        raise CheckpointExists(
            f"{store.url}/{manifest.name}: step {existing.step} is already committed on the live timeline with a "
            "different state; it was kept as it is. To redo this step, restore an earlier checkpoint (the next "
            "save then starts a new timeline) or call mgr.rollback(to=...); or save under another name")
    raise AlreadyExists(f"{store.url}/{manifest.name}: the name stays taken; another writer keeps committing it")


def _taken_by(store: Storage, name: str) -> Manifest | None:
    """The live-or-not manifest holding ``name`` now; damaged ones are quarantined (None then)."""
    try:
        return load_manifest(store, name)
    except NotFound:
        return None
    except FormatVersionError as exc:
        raise AlreadyExists(f"{store.url}/{name} is taken by a checkpoint of a newer format ({exc}); "
                            "save under another name or upgrade cloudckpt") from exc
    except CorruptCheckpoint as exc:
        if is_junk(store, name):
            raise AlreadyExists(junk_advice(store.url, name)) from exc
        quarantine(store, name, str(exc))
        return None


def same_checkpoint(a: Manifest, b: Manifest) -> bool:
    """Whether two manifests hold the same checkpoint: state, tensors, chunks, step, epoch, metrics
    and configuration (not when, where or why it was written, nor its lineage)."""
    def key(m: Manifest) -> tuple:
        return (m.step, m.epoch, m.metrics, m.config, m.compression, m.pickled,
                [(c.key, c.size, c.crc32c) for c in m.chunks], m.tensors, m.state)

    return key(a) == key(b)


@dataclass(frozen=True)
class RollbackReport:
    """What :meth:`CheckpointManager.rollback` did (or, with ``dry_run``, would do)."""

    target: Manifest
    superseded: tuple[Manifest, ...]
    timeline: str | None
    dry_run: bool


def rollback(store: Storage, view: RootView, target: Manifest, *, dry_run: bool,
             live: Callable[[], list[Manifest]]) -> RollbackReport:
    """Make ``target`` the resume point: fork a new timeline at it (which points ``latest`` at
    ``target`` and supersedes what came after), then point each best pointer at the best of
    ``live()`` (readers never depended on them: the resolver ignores pointers to checkpoints that
    are not live).
    """
    target_live = any(m.name == target.name and m.lineage.timeline == target.lineage.timeline
                      for m in view.live_manifests())
    todo = fork_plan(view, ForkPoint(target.name, target.step, target.lineage.timeline, target_live))
    assert todo.abandoned is not None
    if dry_run:
        return RollbackReport(target, tuple(todo.abandoned), None, True)
    lineage = apply_fork(store, todo)  # latest.ckpt now names ``target``
    remaining = [CheckpointInfo.of(m) for m in live()]
    for key, pointer in view.pointers.items():
        if key != LATEST_POINTER and pointer.metric and pointer.mode:
            ranked = best_first(remaining, pointer.metric, pointer.mode)
            if ranked and pointer.target != ranked[0].name:
                best = ranked[0]
                force_pointer(store, key, Pointer(best.name, best.step, pointer.metric,
                                                  best.metrics[pointer.metric], pointer.mode))
    return RollbackReport(target, tuple(todo.abandoned), lineage.timeline, False)
