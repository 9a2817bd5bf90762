"""Timelines: which branch of a root's history is live, kept in one compare-and-swapped record.

A root's checkpoints form a tree.  Every manifest (format version 3) names its timeline and
its parent (:class:`~cloudckpt.format.manifest.Lineage`).  Restoring a checkpoint that is not
the newest of the live timeline and saving, or :meth:`CheckpointManager.rollback`, starts a
new timeline; the record ``.cloudckpt/timeline.json`` then says which one is live::

    {"format": "cloudckpt-timeline", "version": 1, "timeline": "t-5f0c2a9b1e7d",
     "ancestry": [{"timeline": "main", "until_step": 100}],
     "forks": [{"timeline": "t-5f0c2a9b1e7d", "from": "checkpoint_step_00000100.ckpt",
                "from_step": 100, "abandoned": ["checkpoint_step_00000200.ckpt", ...], "at": "..."}]}

**The live rule.**  A manifest at the top of the root is *live* iff there is no record, or its
timeline is the record's ``timeline``, or its timeline is an ``ancestry`` entry and its step is
at most that entry's ``until_step``.  Every other manifest is *superseded*: never ``latest`` or
``best``, never a fallback, and moved under ``superseded/<timeline>/`` by whoever sees it.  Since
the record changes by compare-and-swap, a writer of an abandoned timeline (a zombie) cannot
make its checkpoints live again, whatever it commits afterwards.
"""

from __future__ import annotations

import json
import logging
import math
import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Iterable

from .errors import CorruptCheckpoint, NotFound, TimelineSuperseded
from .format.manifest import MAIN_TIMELINE, Manifest, is_manifest_name, is_timeline_id
from .pointers import compare_and_swap
from .saving import utc_now_text
from .storage.base import Storage

if TYPE_CHECKING:
    from .root_listing import RootListing

log = logging.getLogger(__name__)

TIMELINE_KEY = ".cloudckpt/timeline.json"
RECORD_FORMAT = "cloudckpt-timeline"
#: Fork entries kept in the record (the manifests keep the whole tree; this is for display).
MAX_FORKS = 100


@dataclass(frozen=True)
class Segment:
    """Checkpoints of ``timeline`` up to ``until_step`` (inclusive) are history of the live timeline."""

    timeline: str
    until_step: int


@dataclass(frozen=True)
class LiveTimeline:
    """What the record says; ``recorded`` is False for a root that never branched (all is live)."""

    timeline: str = MAIN_TIMELINE
    ancestry: tuple[Segment, ...] = ()
    forks: tuple[dict[str, Any], ...] = field(default=(), compare=False)
    recorded: bool = False

    def is_live(self, manifest: Manifest) -> bool:
        return self.recorded is False or self.covers(manifest.lineage.timeline, manifest.step)

    def covers(self, timeline: str, step: int) -> bool:
        if timeline == self.timeline:
            return True
        return any(s.timeline == timeline and step <= s.until_step for s in self.ancestry)

    def to_bytes(self) -> bytes:
        body = {"format": RECORD_FORMAT, "version": 1, "timeline": self.timeline,
                "ancestry": [{"timeline": s.timeline, "until_step": s.until_step} for s in self.ancestry],
                "forks": list(self.forks)[-MAX_FORKS:]}
        return json.dumps(body, sort_keys=True, indent=1).encode()

    @classmethod
    def from_bytes(cls, data: bytes, where: str) -> "LiveTimeline":
        try:
            body = json.loads(data)
        except (ValueError, UnicodeDecodeError, RecursionError) as exc:
            raise CorruptCheckpoint(f"{where}: the timeline record is not valid JSON") from exc
        if not isinstance(body, dict) or body.get("format") != RECORD_FORMAT or body.get("version") != 1:
            raise CorruptCheckpoint(f"{where}: not a version-1 cloudckpt timeline record")
        ancestry = body.get("ancestry")
        if not is_timeline_id(body.get("timeline")) or not isinstance(ancestry, list):
            raise CorruptCheckpoint(f"{where}: the timeline record has no valid 'timeline' and 'ancestry'")
        segments = []
        for entry in ancestry:
            step = entry.get("until_step") if isinstance(entry, dict) else None
            if (not isinstance(entry, dict) or not is_timeline_id(entry.get("timeline"))
                    or not isinstance(step, int) or isinstance(step, bool) or step < 0):
                raise CorruptCheckpoint(f"{where}: malformed ancestry entry {str(entry)[:80]}")
            segments.append(Segment(entry["timeline"], step))
        forks = body.get("forks")
        forks = tuple(f for f in forks if isinstance(f, dict)) if isinstance(forks, list) else ()
        return cls(body["timeline"], tuple(segments), forks, recorded=True)


def read_live(store: Storage, listing: "RootListing | None" = None) -> LiveTimeline:
    """The live timeline of ``store``; an unreadable record is an error (nothing is guessed).

    ``listing``: a listing of the root just taken; when it shows no record, none is read (a
    record written since then is a fork that a later check sees, as if this read came first).
    """
    if listing is not None and listing.covers(TIMELINE_KEY) and TIMELINE_KEY not in listing.objects:
        return LiveTimeline()
    try:
        data = store.get(TIMELINE_KEY)
    except NotFound:
        return LiveTimeline()
    return LiveTimeline.from_bytes(data, f"{store.url}/{TIMELINE_KEY}")


def new_timeline_id() -> str:
    return f"t-{uuid.uuid4().hex[:12]}"


@dataclass(frozen=True)
class ForkPoint:
    """Where a new timeline starts: the checkpoint it continues (None: from nothing)."""

    name: str | None
    step: int
    timeline: str | None
    live: bool


def forked(current: LiveTimeline, point: ForkPoint, new_id: str, timelines_seen: Iterable[str],
           abandoned: list[str]) -> LiveTimeline:
    """The record after forking ``new_id`` off ``point`` (pure; see :func:`fork`)."""
    if point.name is None:
        ancestry: list[Segment] = []
    elif not point.live:
        assert point.timeline is not None
        ancestry = [Segment(point.timeline, point.step)]
    else:
        # Everything live now, capped at the fork point's step.  A root that never branched has
        # no record: each timeline its manifests name is then history up to the fork point.
        earlier = list(current.ancestry) + [Segment(current.timeline, math.inf)] if current.recorded \
            else [Segment(t, math.inf) for t in sorted(set(timelines_seen))]  # type: ignore[arg-type]
        ancestry = [Segment(s.timeline, int(min(s.until_step, point.step))) for s in earlier]
    fork_entry = {"timeline": new_id, "from": point.name, "from_step": point.step if point.name else None,
                  "abandoned": sorted(abandoned), "at": utc_now_text()}
    return LiveTimeline(new_id, tuple(ancestry), tuple(current.forks) + (fork_entry,), recorded=True)


def fork(store: Storage, point: ForkPoint, timelines_seen: Iterable[str],
         abandoned: list[str], expected: LiveTimeline) -> LiveTimeline:
    """Make a new timeline live, forked at ``point``, by compare-and-swap of the record.

    Raises TimelineSuperseded if the record is no longer ``expected`` (another writer forked first).
    """
    new_id = new_timeline_id()
    result: list[LiveTimeline] = []
    seen = list(timelines_seen)

    def update(current: bytes | None) -> bytes | None:
        now = LiveTimeline() if current is None else LiveTimeline.from_bytes(current, f"{store.url}/{TIMELINE_KEY}")
        if (now.timeline, now.ancestry, now.recorded) != (expected.timeline, expected.ancestry, expected.recorded):
            raise TimelineSuperseded(
                f"{store.url}: the live timeline changed to {now.timeline} while this writer forked from "
                f"{point.name}; restore the checkpoint you want to continue from and save again")
        record = forked(now, point, new_id, seen, abandoned)
        result[:] = [record]
        return record.to_bytes()

    compare_and_swap(store, TIMELINE_KEY, update)
    return result[0]


def describe_fork(point: ForkPoint, abandoned: list[Manifest]) -> str:
    """The one WARNING line of a fork: both ends of what is abandoned."""
    start = f"{point.name} (step {point.step})" if point.name else "nothing (a fresh start)"
    if not abandoned:
        return f"new timeline from {start}"
    ordered = sorted(abandoned, key=lambda m: (m.step, m.created))
    return (f"branching: continuing from {start}; {len(ordered)} later checkpoint(s) of the old timeline, "
            f"{ordered[0].name} (step {ordered[0].step}) to {ordered[-1].name} (step {ordered[-1].step}), "
            "are superseded: kept under superseded/, never latest or best "
            "(remove them with KeepSuperseded(days=N) or `cloudckpt gc --superseded`)")


def checkpoint_name_of(key: str) -> str | None:
    """The checkpoint name a ``superseded/<timeline>/<name>`` (or top-level) key holds, if any."""
    name = key.rsplit("/", 1)[-1]
    return name if is_manifest_name(name) else None
