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
from .pointers import LATEST_POINTER, Pointer, is_pointer_key, list_pointer_keys, read_pointer
from .reader import load_manifest
from .root_listing import RootListing
from .storage.base import ObjectInfo, Storage
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
    #: What failed after the commit of the save that returned this info (pointers, index, retention);
    #: the checkpoint is committed regardless, and the next save tries those steps again.
    problems: tuple[str, ...] = field(default=(), compare=False)

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
        self._manifests: dict[str, tuple[str | None, Manifest]] = {}  # key -> (token when read, manifest)
        self._listed: dict[str, str] = {}  # key -> token in the latest listing

    def names(self, listing: RootListing | None = None) -> list[str]:
        """Names of the manifests at the top of the root (one listing, or ``listing``; never cached)."""
        listed = listing.top() if listing is not None else self.store.list("", recursive=False)
        return self._note([i for i in listed if is_manifest_name(i.key) and not is_pointer_key(i.key)])

    def superseded_keys(self, listing: RootListing | None = None) -> list[str]:
        """Keys of the manifests under ``superseded/`` (one recursive listing, or ``listing``)."""
        listed = listing.under(SUPERSEDED_PREFIX) if listing is not None else self.store.list(SUPERSEDED_PREFIX)
        return self._note([i for i in listed if is_manifest_name(i.key.rsplit("/", 1)[-1])])

    def _note(self, infos: list[ObjectInfo]) -> list[str]:
        self._listed.update({i.key: i.token for i in infos})
        return [i.key for i in infos]

    def manifest(self, key: str) -> Manifest:
        """The parsed manifest at ``key`` (a name, or ``superseded/<timeline>/<name>``); NotFound,
        CorruptCheckpoint or FormatVersionError.

        Cached, but checked against the latest listing: a name freed by a fork or a quarantine
        may hold another manifest now (the object's token then differs).
        """
        cached = self._manifests.get(key)
        listed = self._listed.get(key)
        if cached is not None and (listed is None or cached[0] == listed):
            return cached[1]
        manifest = self._load(key)
        self._manifests[key] = (listed, manifest)
        return manifest

    def _load(self, key: str) -> Manifest:
        if "/" not in key:
            return load_manifest(self.store, key)
        where = f"{self.store.url}/{key}"
        manifest = parse_manifest(self.store.get(key), where)
        if manifest.name != key.rsplit("/", 1)[-1]:
            raise CorruptCheckpoint(f"{where}: the manifest calls itself {manifest.name!r}")
        return manifest

    def token(self, key: str) -> str | None:
        """The store's token of ``key`` in the latest listing (None if not listed)."""
        return self._listed.get(key)

    def remember(self, manifest: Manifest, token: str | None = None) -> None:
        """Cache a manifest this process just committed (``token``: the store's, if known)."""
        self._manifests[manifest.name] = (token, manifest)
        if token is not None:
            self._listed[manifest.name] = token

    def forget(self, names: set[str]) -> None:
        for name in names:
            self._manifests.pop(name, None)
            self._listed.pop(name, None)

    def readable(self, names: list[str]) -> list[Manifest]:
        """The manifests among ``names`` that parse; the others are logged and left out."""
        manifests = []
        for name in names:
            try:
                manifests.append(self.manifest(name))
            except UNUSABLE as exc:
                log.warning("cannot use %s: %s", name, exc)
        return manifests

    def pointers(self, listing: RootListing | None = None, known: dict[str, Pointer | None] | None = None
                 ) -> dict[str, Pointer]:
        """Every readable pointer object, by key.

        ``listing`` tells which pointers exist (instead of a LIST); ``known`` gives pointers this
        process has just read or written (None: it does not exist), which are not read again.
        """
        known = known or {}
        if listing is None:
            keys = list_pointer_keys(self.store)
        else:
            keys = [LATEST_POINTER] + [i.key for i in listing.top() if is_pointer_key(i.key) and i.key != LATEST_POINTER]
        found: dict[str, Pointer] = {}
        for key in dict.fromkeys(keys + list(known)):
            if key in known:
                if known[key] is not None:
                    found[key] = known[key]  # type: ignore[assignment]
                continue
            try:
                pointer = read_pointer(self.store, key)
            except CorruptCheckpoint as exc:
                log.warning("ignoring pointer: %s", exc)
                continue
            if pointer is not None:
                found[key] = pointer
        return found
