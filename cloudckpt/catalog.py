"""What a checkpoint root holds: committed manifests, the pointers naming them, and which to try first.

Manifests are immutable once committed, so the catalog caches every one it
has parsed; the listing itself (one non-recursive LIST) is never cached,
since other writers commit and delete concurrently.
"""

from __future__ import annotations

import datetime as _dt
import logging
from dataclasses import dataclass, field

from .errors import CorruptCheckpoint, FormatVersionError, NotFound
from .format.manifest import Manifest, check_manifest_name
from .pointers import (
    LATEST_POINTER,
    Pointer,
    best_pointer_key,
    list_manifest_names,
    list_pointer_keys,
    read_pointer,
)
from .reader import load_manifest
from .retention import best_first
from .storage.base import Storage
from .writer import WriteStats

log = logging.getLogger(__name__)

Which = str | int
#: Failures that make one checkpoint unusable (the next candidate is tried).
UNUSABLE = (CorruptCheckpoint, FormatVersionError, NotFound)


@dataclass(frozen=True)
class CheckpointInfo:
    """A committed checkpoint as listings show it."""

    name: str
    step: int
    epoch: int | None
    metrics: dict[str, float | None]
    created: _dt.datetime
    nbytes: int
    reason: str
    pointers: tuple[str, ...] = ()
    stats: WriteStats | None = field(default=None, compare=False, repr=False)
    #: What failed after the commit of the save that returned this info (pointers, index, retention);
    #: the checkpoint is committed regardless, and the next save tries those steps again.
    problems: tuple[str, ...] = field(default=(), compare=False)

    @classmethod
    def of(cls, manifest: Manifest, pointers: tuple[str, ...] = (), stats: WriteStats | None = None) -> "CheckpointInfo":
        return cls(manifest.name, manifest.step, manifest.epoch, dict(manifest.metrics),
                   manifest.created_at, manifest.nbytes, manifest.reason, pointers, stats)


class Catalog:
    """Reads (and caches) the manifests and pointers of one root."""

    def __init__(self, store: Storage) -> None:
        self.store = store
        self._manifests: dict[str, Manifest] = {}

    def names(self) -> list[str]:
        return list_manifest_names(self.store)

    def manifest(self, name: str) -> Manifest:
        """The parsed manifest ``name`` (cached); NotFound, CorruptCheckpoint or FormatVersionError."""
        cached = self._manifests.get(name)
        if cached is None:
            cached = self._manifests[name] = load_manifest(self.store, name)
        return cached

    def remember(self, manifest: Manifest) -> None:
        self._manifests[manifest.name] = manifest

    def forget(self, names: set[str]) -> None:
        for name in names:
            self._manifests.pop(name, None)

    def readable(self, names: list[str]) -> list[Manifest]:
        """The manifests among ``names`` that parse; the others are logged and left out."""
        manifests = []
        for name in names:
            try:
                manifests.append(self.manifest(name))
            except UNUSABLE as exc:
                log.warning("cannot use %s: %s", name, exc)
        return manifests

    def pointers(self) -> dict[str, Pointer]:
        """Every readable pointer object, by key."""
        found: dict[str, Pointer] = {}
        for key in list_pointer_keys(self.store):
            try:
                pointer = read_pointer(self.store, key)
            except CorruptCheckpoint as exc:
                log.warning("ignoring pointer: %s", exc)
                continue
            if pointer is not None:
                found[key] = pointer
        return found

    def infos(self) -> list[CheckpointInfo]:
        """Every readable committed checkpoint, oldest step first, with the pointers that name it."""
        pointers = self.pointers()
        infos = [
            CheckpointInfo.of(m, tuple(sorted(k for k, p in pointers.items() if p.target == m.name)))
            for m in self.readable(self.names())
        ]
        return sorted(infos, key=lambda i: (i.step, i.created))

    def candidates(self, which: Which, *, monitor: str | None, mode: str) -> list[str]:
        """Checkpoint names to try for ``which``, preferred first (fallbacks after).

        For ``"latest"`` the newest committed manifest wins, whatever ``latest.ckpt``
        says: a writer that died between its commit and the pointer move left the
        pointer one checkpoint behind.  The pointer breaks ties between equal steps,
        and a pointed-to manifest that cannot be read comes first (so its error is
        reported, then the next one is tried).  Other unreadable manifests come
        last, so that when nothing else restores, their error is the one raised.
        For ``"best"`` the best pointer comes first (an operator may have promoted
        a checkpoint by hand), then the others best first.
        """
        if isinstance(which, int) and not isinstance(which, bool):
            matches = [i.name for i in self.infos() if i.step == which]
            if not matches:
                raise NotFound(f"{self.store.url}: no checkpoint at step {which}")
            return matches[-1:]
        if which not in ("latest", "best"):
            return [check_manifest_name(which)]
        names = self.names()
        if not names:
            return []
        if which == "best" and monitor is None:
            raise ValueError("which='best' needs a monitor: CheckpointManager(..., monitor='val_loss')")
        pointer = self._pointer(LATEST_POINTER if which == "latest" else best_pointer_key(monitor or ""), names)
        preferred = pointer.target if pointer else None
        infos = [CheckpointInfo.of(m) for m in self.readable(names)]
        if which == "latest":
            infos.sort(key=lambda i: (i.step, i.name == preferred, i.created), reverse=True)
        else:
            infos = best_first(infos, monitor or "", mode)
        ordered = [i.name for i in infos]
        if which == "best" and preferred in ordered:
            ordered.remove(preferred)
        if preferred is not None and preferred not in ordered:
            ordered.insert(0, preferred)  # promoted by hand, or unreadable: try it first, then fall back
        unreadable = [n for n in names if n not in ordered]
        return ordered + (unreadable if which == "latest" else [])

    def _pointer(self, key: str, names: list[str]) -> Pointer | None:
        try:
            pointer = read_pointer(self.store, key)
        except CorruptCheckpoint as exc:
            log.warning("%s; falling back to listing", exc)
            return None
        if pointer is not None and pointer.target not in names:
            log.warning("%s names %s, which does not exist; falling back to listing", key, pointer.target)
            return None
        return pointer
