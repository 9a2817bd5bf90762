"""What ``cloudckpt ls`` shows: live checkpoints with what resolves to them, then superseded,
quarantined and unreadable objects with a status a person can act on; and the timeline tree."""

from __future__ import annotations

import datetime as _dt
from dataclasses import dataclass, field
from typing import Any

from ..aside import Quarantined, list_quarantined
from ..format.manifest import MAIN_TIMELINE, Manifest
from ..pointers import BEST_POINTER_PREFIX, LATEST_POINTER, Pointer
from ..resolver import Resolver, RootView, damage_kind
from ..storage import Storage
from .render import _metric_text, _pointer_label, human_age, human_bytes, table

_STATUS = {
    "damaged": "DAMAGED: restore skips it; move it aside with `cloudckpt verify {root}@{name} --repair`",
    "junk": "NOT A CHECKPOINT: move it aside with `cloudckpt quarantine {root} {name}`",
    "newer": "NEWER FORMAT: upgrade cloudckpt to read it",
}


@dataclass
class RootListing:
    """One root as ``ls`` shows it (read once, rendered as a table, a tree or JSON)."""

    url: str
    view: RootView
    resolved: dict[str, list[str]]             # checkpoint name -> pointer keys resolving to it
    pinned: set[str]
    superseded: list[tuple[str, Manifest]]     # (key, manifest), top-level stragglers included
    quarantined: list[Quarantined]
    unreadable: dict[str, tuple[str, str]] = field(default_factory=dict)  # name -> (kind, error)

    @classmethod
    def of(cls, store: Storage, pinned: set[str]) -> "RootListing":
        resolver = Resolver(store)
        view = resolver.view(superseded=True)
        resolved: dict[str, list[str]] = {}
        latest = resolver.candidates("latest", view=view)
        if latest:
            resolved.setdefault(latest[0], []).append(LATEST_POINTER)
        for key, pointer in sorted(view.pointers.items()):
            if key.startswith(BEST_POINTER_PREFIX) and pointer.metric:
                best = resolver.candidates("best", monitor=pointer.metric, mode=pointer.mode or "min", view=view)
                if best:
                    resolved.setdefault(best[0], []).append(key)
        superseded = [(m.name, m) for m in view.stragglers()] + sorted(view.superseded.items())
        unreadable = {}
        for name, error in sorted(view.problems.items()):
            kind = damage_kind(store, name, error)
            if kind != "gone":
                unreadable[name] = (kind, " ".join(str(error).split()))
        return cls(store.url, view, resolved, pinned, superseded, list_quarantined(store), unreadable)

    @property
    def empty(self) -> bool:
        return not (self.view.manifests or self.superseded or self.quarantined or self.unreadable)

    def _flags(self, name: str) -> list[str]:
        return [_pointer_label(k) for k in self.resolved.get(name, [])] + (["pinned"] if name in self.pinned else [])

    def table(self, now: _dt.datetime) -> str:
        rows = []
        for m in self.view.live_manifests():
            rows.append(_row(m, now, ", ".join(self._flags(m.name))))
        for key, m in sorted(self.superseded, key=lambda pair: (pair[1].step, pair[1].created)):
            rows.append(_row(m, now, f"superseded (timeline {m.lineage.timeline}; restore it by name)"))
        for q in self.quarantined:
            rows.append([q.name, "?", "?", "-", "?", "?", f"quarantined ({q.key}): {q.reason}"])
        for name, (kind, _) in self.unreadable.items():
            rows.append([name, "?", "?", "-", "?", "?", _STATUS[kind].format(root=self.url, name=name)])
        return table(rows, ["NAME", "STEP", "EPOCH", "METRICS", "SIZE", "AGE", "POINTERS"])

    def warnings(self) -> list[str]:
        stale = [f"pointer {k} -> {p.target}, which is not a live checkpoint (readers use "
                 f"{(self._resolved_for(k) or 'nothing')})" for k, p in sorted(self.view.pointers.items())
                 if p.target not in self.view.live_names() and k != LATEST_POINTER]  # the resolver said it
        return stale + [f"{name}: {error}" for name, (_, error) in self.unreadable.items()]

    def _resolved_for(self, key: str) -> str | None:
        return next((name for name, keys in self.resolved.items() if key in keys), None)

    def to_json(self, now: _dt.datetime) -> dict[str, Any]:
        def entry(m: Manifest, **extra: Any) -> dict[str, Any]:
            return {"name": m.name, "step": m.step, "epoch": m.epoch, "metrics": m.metrics, "nbytes": m.nbytes,
                    "stored_bytes": m.stored_bytes, "chunks": len(m.chunks), "created": m.created,
                    "age_seconds": int((now - m.created_at).total_seconds()), "reason": m.reason,
                    "timeline": m.lineage.timeline, "parent": m.lineage.parent, **extra}

        return {
            "root": self.url,
            "timeline": self.view.live.timeline,
            "checkpoints": [entry(m, pointers=self.resolved.get(m.name, []), pinned=m.name in self.pinned)
                            for m in self.view.live_manifests()],
            "superseded": [entry(m, key=key) for key, m in self.superseded],
            "quarantined": [{"name": q.name, "key": q.key, "reason": q.reason, "when": q.when}
                            for q in self.quarantined],
            "unreadable": [{"name": n, "status": kind, "error": error} for n, (kind, error) in self.unreadable.items()],
            "pointers": {k: _pointer_json(p) for k, p in sorted(self.view.pointers.items())},
        }


def _pointer_json(p: Pointer) -> dict[str, Any]:
    return {"target": p.target, "step": p.step, "metric": p.metric, "value": p.value, "mode": p.mode}


def _row(m: Manifest, now: _dt.datetime, status: str) -> list[str]:
    return [m.name, str(m.step), "-" if m.epoch is None else str(m.epoch), _metric_text(m.metrics),
            human_bytes(m.nbytes), human_age(m.created_at, now), status]


def render_tree(listing: RootListing) -> str:
    """The root's history: each timeline's checkpoints in order, forks indented under their fork point."""
    nodes: list[tuple[Manifest, str]] = [(m, ", ".join(listing._flags(m.name)) or "live")
                                         for m in listing.view.live_manifests()]
    nodes += [(m, "superseded") for _, m in listing.superseded]
    by_name: dict[str, list[Manifest]] = {}
    for m, _ in nodes:
        by_name.setdefault(m.name, []).append(m)
    fork_points = {str(f.get("timeline")): str(f.get("from")) for f in listing.view.live.forks}
    children: dict[int, list[tuple[Manifest, str]]] = {}
    roots = []
    for node in sorted(nodes, key=lambda n: (n[0].step, n[0].created)):
        parent = _parent_of(node[0], by_name, fork_points)
        if parent is None:
            roots.append(node)
        else:
            children.setdefault(id(parent), []).append(node)
    live_id = listing.view.live.timeline
    forks = {f.get("timeline"): f for f in listing.view.live.forks}
    lines = [f"{listing.url}  (live timeline: {live_id})"]
    shown: set[str] = set()

    def timeline_label(timeline: str) -> str:
        return f"timeline {timeline}" + (" (live)" if timeline == live_id else "")

    def chain(node: tuple[Manifest, str], indent: str) -> None:
        while node is not None:
            m, status = node
            lines.append(f"{indent}{m.name}  step {m.step}  {status}")
            shown.add(m.lineage.timeline)
            kids = children.get(id(m), [])
            same = [k for k in kids if k[0].lineage.timeline == m.lineage.timeline]
            nxt = same[0] if same else None
            for fork in [k for k in kids if k is not nxt]:
                lines.append(f"{indent}├── {timeline_label(fork[0].lineage.timeline)}, from {m.name}")
                chain(fork, indent + "│     ")
            for timeline, f in forks.items():
                if f.get("from") == m.name and timeline not in {k[0].lineage.timeline for k in kids}:
                    lines.append(f"{indent}├── {timeline_label(str(timeline))}, from {m.name}: no checkpoint yet")
            node = nxt  # type: ignore[assignment]

    for root_node in roots:
        parent = root_node[0].lineage.parent
        lines.append(timeline_label(root_node[0].lineage.timeline)
                     + (f", continuing {parent} (no longer stored)" if parent else ""))
        chain(root_node, "  ")
    return "\n".join(lines)


def _parent_of(m: Manifest, by_name: dict[str, list[Manifest]], fork_points: dict[str, str]) -> Manifest | None:
    """The node ``m`` continues: its parent on its own timeline, else (the first checkpoint of a
    timeline) the fork point on another; None when that checkpoint is no longer stored."""
    if m.lineage.parent is None:
        return None
    found = [p for p in by_name.get(m.lineage.parent, []) if p is not m and p.step <= m.step]
    same = [p for p in found if p.lineage.timeline == m.lineage.timeline]
    if same:
        return same[-1]
    if fork_points.get(m.lineage.timeline) == m.lineage.parent or m.lineage.timeline == MAIN_TIMELINE:
        other = [p for p in found if p.lineage.timeline != m.lineage.timeline]
        return other[-1] if other else None
    return None
