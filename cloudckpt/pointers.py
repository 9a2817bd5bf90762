"""Pointer objects (``latest.ckpt``, ``best_model_<metric>.ckpt``) and the run's index file.

Object stores have no symlinks; a pointer is a small JSON object naming a
checkpoint.  Pointers move only by compare-and-swap (``IfMatch`` on the token
read), and only forward: a writer whose checkpoint is older (lower step) or
worse (for best) than what the pointer names leaves it alone, so a zombie
writer can never move a pointer backwards.  There is never a moment without a
pointer (no delete-then-create).
"""

from __future__ import annotations

import json
import logging
import math
import random
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable, TypeVar

from .errors import AlreadyExists, CorruptCheckpoint, NotFound, PreconditionFailed
from . import single_writer
from .format.manifest import is_manifest_name
from .storage.base import IfMatch, PutMode, Storage

log = logging.getLogger(__name__)

LATEST_POINTER = "latest.ckpt"
BEST_POINTER_PREFIX = "best_model_"
STATE_KEY = ".cloudckpt/state.json"
POINTER_FORMAT = "cloudckpt-pointer"
_MAX_CAS_ATTEMPTS = 50

T = TypeVar("T")


def best_pointer_key(metric: str) -> str:
    safe = "".join(ch if ch.isalnum() or ch in "._-" else "_" for ch in metric)
    return f"{BEST_POINTER_PREFIX}{safe}.ckpt"


def is_pointer_key(key: str) -> bool:
    return key == LATEST_POINTER or (key.startswith(BEST_POINTER_PREFIX) and key.endswith(".ckpt"))


def list_manifest_names(store: Storage) -> list[str]:
    """Names of the committed checkpoints at the root of ``store`` (one non-recursive listing)."""
    return [
        info.key for info in store.list("", recursive=False)
        if is_manifest_name(info.key) and not is_pointer_key(info.key)
    ]


def list_pointer_keys(store: Storage) -> list[str]:
    """``latest.ckpt`` (whether or not it exists) and every ``best_model_*.ckpt`` present."""
    return [LATEST_POINTER] + [
        info.key for info in store.list(BEST_POINTER_PREFIX, recursive=False) if is_pointer_key(info.key)
    ]


@dataclass(frozen=True)
class Pointer:
    """What a pointer object says: the checkpoint it names and why."""

    target: str
    step: int
    metric: str | None = None
    value: float | None = None
    mode: str | None = None

    def to_bytes(self) -> bytes:
        body = {"format": POINTER_FORMAT, "version": 1, **asdict(self)}
        if self.value is not None and not math.isfinite(self.value):
            body["value"] = None
        return json.dumps(body, sort_keys=True).encode()

    @classmethod
    def from_bytes(cls, data: bytes, where: str) -> "Pointer":
        try:
            body = json.loads(data)
        except (ValueError, UnicodeDecodeError, RecursionError) as exc:
            raise CorruptCheckpoint(f"{where}: pointer is not valid JSON") from exc
        if not isinstance(body, dict) or body.get("format") != POINTER_FORMAT:
            raise CorruptCheckpoint(f"{where}: not a cloudckpt pointer object")
        target, step, value = body.get("target"), body.get("step"), body.get("value")
        if not isinstance(target, str) or not is_manifest_name(target) or is_pointer_key(target):
            raise CorruptCheckpoint(f"{where}: pointer target {target!r} is not a checkpoint name")
        if not isinstance(step, int) or isinstance(step, bool) or step < 0:
            raise CorruptCheckpoint(f"{where}: pointer step {step!r} is not a non-negative integer")
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise CorruptCheckpoint(f"{where}: pointer value {value!r} is not a number")
        metric, mode = body.get("metric"), body.get("mode")
        return cls(
            target=target,
            step=step,
            metric=metric if isinstance(metric, str) else None,
            value=None if value is None else float(value),
            mode=mode if mode in ("min", "max") else None,
        )


def is_better(value: float | None, than: float | None, mode: str) -> bool:
    """Whether ``value`` strictly beats ``than`` (so ties keep the earlier checkpoint)."""
    if value is None or math.isnan(value):
        return False
    if than is None or math.isnan(than):
        return True
    return value < than if mode == "min" else value > than


def read_pointer(store: Storage, key: str) -> Pointer | None:
    """The pointer stored at ``key``; None if there is none. Raises CorruptCheckpoint if unreadable."""
    try:
        data = store.get(key)
    except NotFound:
        return None
    return Pointer.from_bytes(data, f"{store.url}/{key}")


def compare_and_swap(
    store: Storage,
    key: str,
    update: Callable[[bytes | None], bytes | None],
    *,
    sleep: Callable[[float], None] = time.sleep,
) -> bool:
    """Apply ``update`` (old bytes or None -> new bytes, or None to leave it) atomically.

    Re-reads and retries when another writer got there first.  Returns whether
    this call wrote.
    """
    for attempt in range(_MAX_CAS_ATTEMPTS):
        mode: PutMode
        current: bytes | None
        try:
            current, token = store.get_with_token(key)
            mode = IfMatch(token)
        except NotFound:
            current, mode = None, "create"
        new = update(current)
        if new is None:
            return False
        try:
            store.put(key, new, mode=mode)
            if single_writer.confirmed(store, key, new, "Re-reading it and re-applying this change."):
                return True
        except (AlreadyExists, PreconditionFailed, NotFound):
            log.debug("%s/%s changed under us (attempt %d); re-reading", store.url, key, attempt + 1)
            sleep(random.uniform(0, 0.01 * (attempt + 1)))
    raise PreconditionFailed(
        f"{store.url}/{key}: gave up after {_MAX_CAS_ATTEMPTS} compare-and-swap attempts; "
        "too many writers are updating it at once"
    )


def advance_latest(store: Storage, pointer: Pointer, *, stale: Callable[[Pointer], bool] | None = None,
                   seen: dict[str, Pointer | None] | None = None) -> bool:
    """Move ``latest.ckpt`` to ``pointer`` unless it already names a later step.

    ``stale(old)`` says whether the pointer's current target is no longer live (superseded or
    gone): such a pointer is replaced whatever its step.  It is asked only when it matters.
    ``seen`` receives what the pointer names once this call returns (see :func:`compare_and_swap`).
    """

    def update(current: bytes | None) -> bytes | None:
        old = _parse_or_none(store, LATEST_POINTER, current)
        if old is not None and old.step > pointer.step and not (stale and stale(old)):
            log.info("latest.ckpt names step %d, newer than %s (step %d); left as is",
                     old.step, pointer.target, pointer.step)
            return _note(seen, LATEST_POINTER, old, None)
        if old == pointer:
            return _note(seen, LATEST_POINTER, old, None)
        return _note(seen, LATEST_POINTER, pointer, pointer.to_bytes())

    return compare_and_swap(store, LATEST_POINTER, update)


def _note(seen: dict[str, Pointer | None] | None, key: str, pointer: Pointer | None, new: bytes | None) -> bytes | None:
    """Record in ``seen`` what ``key`` names if ``new`` (None: nothing) is what the update writes; return ``new``.

    The last call of an update wins: a compare-and-swap that loses a race runs its update again.
    """
    if seen is not None:
        seen[key] = pointer
    return new


def promote_best(store: Storage, pointer: Pointer, *, stale: Callable[[Pointer], bool] | None = None,
                 seen: dict[str, Pointer | None] | None = None) -> bool:
    """Move the best pointer for ``pointer.metric`` if ``pointer.value`` strictly beats its value
    (or ``stale(old)`` says its current target is no longer live).  ``seen``: as for
    :func:`advance_latest`."""
    assert pointer.metric is not None and pointer.mode is not None
    key = best_pointer_key(pointer.metric)

    def update(current: bytes | None) -> bytes | None:
        old = _parse_or_none(store, key, current)
        if old is not None and old.target != pointer.target and not is_better(
            pointer.value, old.value, pointer.mode or "min"
        ) and not (stale and stale(old)):
            return _note(seen, key, old, None)
        if old == pointer:
            return _note(seen, key, old, None)
        return _note(seen, key, pointer, pointer.to_bytes())

    return compare_and_swap(store, key, update)


def force_pointer(store: Storage, key: str, pointer: Pointer) -> tuple[str | None, bool]:
    """Compare-and-swap ``key`` to ``pointer`` whatever it names now (an operator's decision, or a
    rollback).  Returns (the target it named before, whether it changed)."""
    before: list[str | None] = [None]

    def update(current: bytes | None) -> bytes | None:
        old = _parse_or_none(store, key, current)
        before[0] = old.target if old is not None else None
        return None if old == pointer else pointer.to_bytes()

    changed = compare_and_swap(store, key, update)
    return before[0], changed


def _parse_or_none(store: Storage, key: str, data: bytes | None) -> Pointer | None:
    if data is None:
        return None
    try:
        return Pointer.from_bytes(data, f"{store.url}/{key}")
    except CorruptCheckpoint as exc:
        log.warning("%s; it will be replaced", exc)
        return None


def update_json(store: Storage, key: str, change: Callable[[dict[str, Any]], dict[str, Any] | None]) -> bool:
    """Compare-and-swap a JSON object (e.g. the run's state file); ``change`` returns the new body or None."""

    def update(current: bytes | None) -> bytes | None:
        body: dict[str, Any] = {}
        if current is not None:
            try:
                loaded = json.loads(current)
                body = loaded if isinstance(loaded, dict) else {}
            except (ValueError, UnicodeDecodeError, RecursionError):
                log.warning("%s/%s is not valid JSON; rebuilding it", store.url, key)
        new = change(body)
        return None if new is None else json.dumps(new, sort_keys=True, indent=1).encode()

    return compare_and_swap(store, key, update)
