"""What a checkpoint root holds: committed manifests and the pointers naming them (parsed, cached).

Which checkpoint ``latest``, ``best`` or a step means is :mod:`cloudckpt.resolver`'s job.

Manifests are immutable once committed, so the catalog caches every one it
has parsed; the listing itself (one non-recursive LIST) is never cached,
since other writers commit and delete concurrently.
"""

from __future__ import annotations

import datetime as _dt
import logging
from dataclasses import dataclass, field

from .aside import SUPERSEDED_PREFIX
from .errors import CorruptCheckpoint, FormatVersionError, NotFound
from .format.manifest import MAIN_TIMELINE, Manifest, is_manifest_name, parse_manifest
from .pointers import Pointer, list_manifest_names, list_pointer_keys, read_pointer
from .reader import load_manifest
from .storage.base import Storage
from .writer import WriteStats

log = logging.getLogger(__name__)

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
    timeline: str = MAIN_TIMELINE
    parent: str | None = None
    superseded: bool = False

    @classmethod
    def of(cls, manifest: Manifest, pointers: tuple[str, ...] = (), stats: WriteStats | None = None, *,
           superseded: bool = False) -> "CheckpointInfo":
        return cls(manifest.name, manifest.step, manifest.epoch, dict(manifest.metrics),
                   manifest.created_at, manifest.nbytes, manifest.reason, pointers, stats,
                   manifest.lineage.timeline, manifest.lineage.parent, superseded)


class Catalog:
    """Reads (and caches) the manifests and pointers of one root."""

    def __init__(self, store: Storage) -> None:
        self.store = store
        self._manifests: dict[str, Manifest] = {}

    def names(self) -> list[str]:
        return list_manifest_names(self.store)

    def superseded_keys(self) -> list[str]:
        """Keys of the manifests under ``superseded/`` (one recursive listing)."""
        return [i.key for i in self.store.list(SUPERSEDED_PREFIX) if is_manifest_name(i.key.rsplit("/", 1)[-1])]

    def manifest(self, key: str) -> Manifest:
        """The parsed manifest at ``key`` (a name, or ``superseded/<timeline>/<name>``), cached;
        NotFound, CorruptCheckpoint or FormatVersionError."""
        cached = self._manifests.get(key)
        if cached is None:
            cached = self._manifests[key] = self._load(key)
        return cached

    def _load(self, key: str) -> Manifest:
        if "/" not in key:
            return load_manifest(self.store, key)
        where = f"{self.store.url}/{key}"
        manifest = parse_manifest(self.store.get(key), where)
        if manifest.name != key.rsplit("/", 1)[-1]:
            raise CorruptCheckpoint(f"{where}: the manifest calls itself {manifest.name!r}")
        return manifest

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
