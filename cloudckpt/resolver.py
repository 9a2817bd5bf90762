"""The one answer to "which checkpoint": ``latest``, ``best``, a name, a step, a timeline.

The library (:class:`CheckpointManager`), every ``cloudckpt`` command, the distributed manager
and the integrations ask this module; nothing else interprets pointers or orders manifests.

**The rule** (docs/FORMAT.md, section "Which checkpoint"):

* Only *live* manifests count (:mod:`cloudckpt.timeline`): top-level, readable, on the live
  timeline or its history.  Superseded, quarantined and unreadable ones are never chosen for
  ``latest`` or ``best`` and never a fallback.
* ``latest``: the live manifest with the highest step; among equal steps the one ``latest.ckpt``
  names, then the newest ``created``.  The pointer is only a hint: a writer that died between
  its commit and the pointer move left it one checkpoint behind.
* ``best``: the best pointer's target if it is live (an operator may have promoted it), then the
  live checkpoints best first by ``monitor``/``mode`` (ties: the earlier step).
* a step: the live checkpoint of that step (the newest ``created`` if several).
* a name: that manifest, even superseded (``superseded/<timeline>/<name>``), so abandoned work
  stays reachable on purpose, never by accident.
* ``timeline:<id>``: the newest checkpoint of that timeline, live or superseded.

Candidates come back preferred first; for ``latest`` and ``best`` the rest are fallbacks.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field

from .catalog import UNUSABLE, Catalog, CheckpointInfo
from .errors import CorruptCheckpoint, FormatVersionError, NotFound
from .format.manifest import FORMAT_NAME, Manifest, check_manifest_name
from .pointers import BEST_POINTER_PREFIX, LATEST_POINTER, Pointer, best_pointer_key, is_pointer_key
from .retention import best_first
from .root_listing import RootListing
from .storage.base import Storage
from .timeline import LiveTimeline, read_live

log = logging.getLogger(__name__)

Which = str | int
TIMELINE_PREFIX = "timeline:"


@dataclass
class RootView:
    """One consistent look at a root: its top-level manifests, the live timeline, the pointers."""

    url: str
    live: LiveTimeline
    manifests: dict[str, Manifest]
    problems: dict[str, Exception]
    pointers: dict[str, Pointer]
    superseded: dict[str, Manifest] = field(default_factory=dict)  # key -> manifest, when listed
    tokens: dict[str, str | None] = field(default_factory=dict)  # top-level name -> token as listed

    def is_live(self, manifest: Manifest) -> bool:
        return self.live.is_live(manifest)

    def live_manifests(self) -> list[Manifest]:
        """Live checkpoints, oldest first (by step, then creation time)."""
        return sorted((m for m in self.manifests.values() if self.is_live(m)), key=lambda m: (m.step, m.created))

    def stragglers(self) -> list[Manifest]:
        """Top-level manifests that are not live (a crash or a zombie left them): to move aside."""
        return [m for m in self.manifests.values() if not self.is_live(m)]

    def live_names(self) -> set[str]:
        return {m.name for m in self.live_manifests()}

    def info(self, manifest: Manifest, *, superseded: bool = False) -> CheckpointInfo:
        """``manifest`` as a listing shows it; ``superseded`` for one kept under ``superseded/``."""
        if superseded or not self.is_live(manifest):
            return CheckpointInfo.of(manifest, superseded=True)
        names = tuple(sorted(k for k, p in self.pointers.items() if p.target == manifest.name))
        return CheckpointInfo.of(manifest, names)

    def infos(self) -> list[CheckpointInfo]:
        """Live checkpoints, oldest first, with the pointers naming them."""
        return [self.info(m) for m in self.live_manifests()]


class Resolver:
    """Answers ``which`` for one root.  Reads only; never moves or deletes anything."""

    def __init__(self, store: Storage, catalog: Catalog | None = None) -> None:
        self.store = store
        self.catalog = catalog or Catalog(store)

    def view(self, *, superseded: bool = False, pointers: bool = True, listing: RootListing | None = None,
             live: LiveTimeline | None = None, known_pointers: dict[str, Pointer | None] | None = None) -> RootView:
        """List and parse the root now (parsed manifests are cached; listings never are).

        ``superseded`` lists ``superseded/`` too; ``pointers=False`` skips reading the pointers.
        ``listing``: a listing of the root this caller just took, used instead of listing again;
        ``live``: the live timeline as this caller just read it; ``known_pointers``: pointers it
        just read or wrote (see :meth:`Catalog.pointers`).
        """
        names = self.catalog.names(listing)  # first: a missing bucket fails here, in one request
        if live is None:
            live = read_live(self.store, listing)
        manifests: dict[str, Manifest] = {}
        problems: dict[str, Exception] = {}
        for name in names:
            try:
                manifests[name] = self.catalog.manifest(name)
            except UNUSABLE as exc:
                problems[name] = exc
        found = self.catalog.pointers(listing, known_pointers) if pointers else {}
        view = RootView(self.store.url, live, manifests, problems, found,
                        tokens={name: self.catalog.token(name) for name in names})
        if superseded:
            for key in self.catalog.superseded_keys(listing if listing is not None and listing.recursive else None):
                try:
                    view.superseded[key] = self.catalog.manifest(key)
                except UNUSABLE as exc:
                    log.warning("cannot read superseded %s: %s", key, exc)
        return view

    def candidates(self, which: Which, *, monitor: str | None = None, mode: str = "min",
                   view: RootView | None = None) -> list[str]:
        """Keys of the manifests to try for ``which``, preferred first (see the module's rule)."""
        if isinstance(which, bool) or not isinstance(which, (str, int)):
            raise TypeError(f"which must be 'latest', 'best', a checkpoint name or a step, got {which!r}")
        if isinstance(which, str) and which not in ("latest", "best") and not which.startswith(TIMELINE_PREFIX):
            return [self._by_name(which)]
        view = view or self.view(superseded=isinstance(which, str) and which.startswith(TIMELINE_PREFIX))
        live = view.live_manifests()
        if isinstance(which, int):
            matches = [m.name for m in live if m.step == which]
            if not matches:
                raise NotFound(f"{self.store.url}: no live checkpoint at step {which}"
                               + _others_hint(view, lambda m: m.step == which))
            return matches[-1:]
        if which.startswith(TIMELINE_PREFIX):
            return self._by_timeline(view, which[len(TIMELINE_PREFIX):])
        if which == "latest":
            pointed = view.pointers.get(LATEST_POINTER)
            preferred = pointed.target if pointed else None
            if preferred is not None and preferred not in view.live_names():
                state = "is not live (superseded)" if preferred in view.manifests else "does not exist"
                log.warning("%s/%s names %s, which %s; using the newest live checkpoint", self.store.url,
                            LATEST_POINTER, preferred, state if preferred not in view.problems else "is unreadable")
            ordered = sorted(live, key=lambda m: (m.step, m.name == preferred, m.created), reverse=True)
            return [m.name for m in ordered]
        if monitor is None:
            raise ValueError("which='best' needs a monitor: CheckpointManager(..., monitor='val_loss')")
        ranked = [i.name for i in best_first([CheckpointInfo.of(m) for m in live], monitor, mode)]
        pointed = view.pointers.get(best_pointer_key(monitor))
        if pointed is not None and pointed.target in view.live_names():
            ranked = [pointed.target] + [n for n in ranked if n != pointed.target]
        return ranked

    def resolve(self, which: Which, *, monitor: str | None = None, mode: str = "min") -> str:
        """The key ``which`` stands for now (no fallback); NotFound if none."""
        found = self.candidates(which, monitor=monitor, mode=mode)
        if not found:
            raise NotFound(f"{self.store.url}: no {which} checkpoint here")
        return found[0]

    def _by_name(self, name: str) -> str:
        if is_pointer_key(name):
            raise ValueError(f"{name!r} is a pointer, not a checkpoint: ask for 'latest' or 'best'")
        check_manifest_name(name)
        if self._exists(name):
            return name
        matches = [k for k in self.catalog.superseded_keys() if k.rsplit("/", 1)[-1] == name]
        if not matches:
            raise NotFound(f"{self.store.url}/{name}: no such checkpoint")
        return matches[-1]

    def _by_timeline(self, view: RootView, timeline: str) -> list[str]:
        found = [(m, m.name) for m in view.manifests.values() if m.lineage.timeline == timeline]
        found += [(m, key) for key, m in view.superseded.items() if m.lineage.timeline == timeline]
        if not found:
            raise NotFound(f"{self.store.url}: no checkpoint on timeline {timeline!r}")
        found.sort(key=lambda pair: (pair[0].step, pair[0].created))
        return [found[-1][1]]

    def _exists(self, key: str) -> bool:
        try:
            self.store.head(key)
        except NotFound:
            return False
        return True

    def best_metric(self, metric: str | None = None) -> tuple[str, str]:
        """(metric, mode) of the root's best pointer: ``metric``'s, or the only one there is."""
        pointers = {k: p for k, p in self.catalog.pointers().items() if k.startswith(BEST_POINTER_PREFIX)}
        if metric is not None:
            pointer = pointers.get(best_pointer_key(metric))
            return metric, (pointer.mode if pointer and pointer.mode else "min")
        if len(pointers) == 1:
            pointer = next(iter(pointers.values()))
            return pointer.metric or "", pointer.mode or "min"
        if not pointers:
            raise NotFound(f"{self.store.url}: no best pointer here, so no best checkpoint")
        raise ValueError(f"{self.store.url} has several best pointers ({', '.join(sorted(pointers))}); "
                         "choose the metric")


def _others_hint(view: RootView, match) -> str:
    names = [m.name for m in view.stragglers() if match(m)]
    return f" ({', '.join(names)} is superseded; ask for it by name)" if names else ""


def is_junk(store: Storage, name: str) -> bool:
    """Whether the top-level ``name`` is not a cloudckpt manifest at all (a stray object)."""
    try:
        data = store.get(name)
    except NotFound:
        return False
    try:
        body = json.loads(data)
    except (ValueError, UnicodeDecodeError, RecursionError):
        # a manifest cut short still starts like one: damaged, not junk
        return f'"format": "{FORMAT_NAME}"'.encode() not in data[:4096]
    return not isinstance(body, dict) or body.get("format") != FORMAT_NAME


def damage_kind(store: Storage, name: str, error: Exception) -> str:
    """``"damaged"`` (quarantine it), ``"junk"`` (report it), ``"newer"`` or ``"gone"`` (leave it)."""
    if isinstance(error, FormatVersionError):
        return "newer"
    if isinstance(error, NotFound):
        return "gone"
    assert isinstance(error, CorruptCheckpoint)
    return "junk" if is_junk(store, name) else "damaged"


def junk_advice(url: str, name: str) -> str:
    return (f"{url}/{name} is not a cloudckpt manifest; it is ignored. Move it out of the root with "
            f"`cloudckpt quarantine {url} {name}`")


__all__ = ["RootView", "Resolver", "Which", "damage_kind", "is_junk", "junk_advice"]
