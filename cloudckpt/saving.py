"""The save path's pieces around the upload: the manifest's metadata, and what follows a commit.

:mod:`cloudckpt.writer` uploads chunks and commits the manifest; this module builds what goes
into the manifest besides tensors, and moves the pointers once the checkpoint exists.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import logging
import math
import socket
from typing import Any, Callable, Iterator, Mapping

import torch

from . import __version__, run_index
from .catalog import CheckpointInfo
from .format.manifest import Manifest
from .format.serialize import has_pickled_leaves
from .pointers import (
    LATEST_POINTER,
    STATE_KEY,
    Pointer,
    advance_latest,
    best_pointer_key,
    promote_best,
    update_json,
)
from .retention import best_first
from .state import RNG_KEY, RNGState
from .storage import Storage

log = logging.getLogger("cloudckpt.manager")

#: One step after a commit: what it does (for the report of a failure), and the call.
Step = tuple[str, Callable[[], None]]


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


def utc_now_text() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat().replace("+00:00", "Z")


def with_rng(state: Mapping[str, Any], capture_rng: bool) -> dict[str, Any]:
    """The user's state plus the RNG streams (under the reserved key), after checking its keys."""
    if not isinstance(state, Mapping):
        raise TypeError(f"state must be a mapping of names to values, got {type(state).__name__}")
    if RNG_KEY in state:
        raise ValueError(f"{RNG_KEY!r} is reserved for the RNG state cloudckpt captures")
    bad = [k for k in state if not isinstance(k, str) or k.startswith("__")]
    if bad:
        raise ValueError(f"state keys must be strings not starting with '__', got {bad!r}")
    return {**state, RNG_KEY: RNGState()} if capture_rng else dict(state)


def checkpoint_metadata(*, step: int, epoch: int | None, reason: str, metrics: Mapping[str, Any],
                        config: dict[str, Any], tree: Any, allow_pickle: bool) -> dict[str, Any]:
    """The manifest fields of a save besides its tensors, chunks and state tree."""
    return dict(
        step=step, epoch=epoch, reason=reason,
        metrics={str(k): metric_value(k, v) for k, v in metrics.items()},
        created=utc_now_text(), library_version=__version__, host=socket.gethostname(), config=config,
        pickled=allow_pickle and has_pickled_leaves(tree),
    )


class AfterCommit:
    """What the steps after a commit saw of the root, for the retention that follows them:
    the pointers as each step left them, and the pins in the run index it updated."""

    def __init__(self) -> None:
        self.pointers: dict[str, Pointer | None] = {}
        self.pins: set[str] | None = None


def pointer_steps(store: Storage, manifest: Manifest, committed: Callable[[], list[Manifest]], *,
                  monitor: str | None, mode: str, top_k: int, moved: list[str],
                  live_now: Callable[[], list[Manifest]] | None = None,
                  seen: AfterCommit | None = None) -> list[Step]:
    """The steps after ``manifest`` is committed: advance ``latest``, promote the best, record it in
    the index.  Each step appends the pointer it moved to ``moved``; the caller runs them one by one
    so that a failure of one is reported without skipping the others.

    ``committed()`` lists the live checkpoints that count for the best; ``live_now()`` (default:
    ``committed``) lists them afresh, to tell whether a pointer names one that is no longer live.
    ``stale`` asks ``committed()`` first and ``live_now()`` only for a pointer naming a checkpoint
    not among those; each is called only when needed.  ``seen`` receives what the steps read.
    """
    listed: list[set[str]] = []
    live: list[set[str]] = []
    seen = seen or AfterCommit()

    def stale(old: Pointer) -> bool:
        if not listed:
            listed.append({m.name for m in committed()})
        if old.target in listed[0]:
            return False  # live when this save listed the root
        if not live:
            live.append({m.name for m in (live_now or committed)()})
        return old.target not in live[0]

    def latest() -> None:
        with _forgotten_on_failure(seen.pointers, LATEST_POINTER):
            if advance_latest(store, Pointer(manifest.name, manifest.step), stale=stale, seen=seen.pointers):
                moved.append(LATEST_POINTER)

    def best() -> None:
        if monitor:
            with _forgotten_on_failure(seen.pointers, best_pointer_key(monitor)):
                if _promote_best(store, manifest, committed, monitor, mode, stale, seen.pointers):
                    moved.append(best_pointer_key(monitor))

    def index() -> None:
        def change(body: dict[str, Any]) -> dict[str, Any]:
            seen.pins = run_index.pins(body)
            return run_index.record(body, manifest, monitor=monitor, mode=mode, top_k=top_k)

        try:
            update_json(store, STATE_KEY, change)
        except BaseException:
            seen.pins = None
            raise

    return [("moving latest.ckpt", latest), ("moving the best pointer", best), ("updating the run index", index)]


@contextlib.contextmanager
def _forgotten_on_failure(seen: dict[str, Pointer | None], key: str) -> Iterator[None]:
    """Drop ``key`` from ``seen`` if the block fails: what it noted may not be what is stored."""
    try:
        yield
    except BaseException:
        seen.pop(key, None)
        raise


def _promote_best(store: Storage, manifest: Manifest, committed: Callable[[], list[Manifest]], monitor: str,
                  mode: str, stale: Callable[[Pointer], bool], seen: dict[str, Pointer | None]) -> bool:
    if not manifest.metrics:
        return False
    value = manifest.metrics.get(monitor)
    if monitor not in manifest.metrics:
        log.warning("metric %r missing from the metrics of %s; it cannot become the best", monitor, manifest.name)
        return False
    if value is None or math.isnan(value):
        log.warning("metric %r of %s is NaN; it cannot become the best", monitor, manifest.name)
        return False
    # The best of everything committed, not just this checkpoint: a writer that died between
    # its commit and the pointer move left the pointer behind, and this repairs it.
    infos = [CheckpointInfo.of(m) for m in committed()]
    best = (best_first(infos, monitor, mode) or [CheckpointInfo.of(manifest)])[0]
    return promote_best(store, Pointer(best.name, best.step, monitor, best.metrics[monitor], mode), stale=stale,
                        seen=seen)
