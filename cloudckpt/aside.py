"""Moving manifests out of the top of a root: superseded (kept) and quarantined (damaged).

A checkpoint's name is free again once its manifest leaves the top of the root.  Moves copy
first and delete second, so a crash between the two leaves the manifest in both places (the
next reader finishes the move), never in neither.

* ``superseded/<timeline>/<name>``: a checkpoint of an abandoned timeline, byte for byte.  It
  still protects its chunks; it goes only by ``KeepSuperseded(days=N)`` or
  ``cloudckpt gc --superseded``.  ``restore(which=name)`` still finds it.
* ``quarantine/<stamp>/<name>`` plus ``quarantine/<stamp>/reason.json``: a manifest that failed
  verification (or an object that is not a manifest at all), with why.  It protects nothing:
  the chunks only it referenced become garbage for the sweeper.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import uuid
from dataclasses import dataclass
from typing import Iterable

from .errors import NotFound
from .storage.base import ObjectInfo, Storage

log = logging.getLogger(__name__)

SUPERSEDED_PREFIX = "superseded/"
QUARANTINE_PREFIX = "quarantine/"
REASON_FILE = "reason.json"


def superseded_key(timeline: str, name: str) -> str:
    return f"{SUPERSEDED_PREFIX}{timeline}/{name}"


def move(store: Storage, src: str, dst: str) -> bool:
    """Copy ``src`` to ``dst``, then delete ``src``.  False if ``src`` was already gone."""
    try:
        store.copy(src, dst)
    except NotFound:
        return False
    store.delete([src])
    return True


def supersede(store: Storage, name: str, timeline: str, token: str | None = None) -> None:
    """Move the top-level manifest ``name`` of ``timeline`` under ``superseded/``.

    With ``token`` (as listed), nothing moves if the name holds another object by now: a
    writer of the live timeline may have reused the name since the listing.
    """
    if token is not None:
        try:
            if store.head(name).token != token:
                return
        except NotFound:
            return
    if move(store, name, superseded_key(timeline, name)):
        log.info("moved %s/%s to %s", store.url, name, superseded_key(timeline, name))


@dataclass(frozen=True)
class Quarantined:
    """One quarantined object: where it is now, what it was called, and why it was moved."""

    key: str
    name: str
    reason: str
    when: str


def quarantine(store: Storage, name: str, reason: str) -> str | None:
    """Move the top-level object ``name`` under ``quarantine/`` with ``reason``; its key (None if gone)."""
    now = _dt.datetime.now(_dt.timezone.utc)
    reason = reason.removeprefix(f"{store.url}/{name}: ")  # the error names the object; the log does too
    folder = f"{QUARANTINE_PREFIX}{now.strftime('%Y%m%dT%H%M%SZ')}-{uuid.uuid4().hex[:6]}/"
    body = {"name": name, "reason": " ".join(reason.split()), "when": now.isoformat().replace("+00:00", "Z")}
    store.put(folder + REASON_FILE, json.dumps(body, sort_keys=True, indent=1).encode())
    if not move(store, name, folder + name):
        store.delete([folder + REASON_FILE])
        return None
    log.warning("quarantined %s/%s: %s (moved to %s%s; a later save may reuse the name)",
                store.url, name, body["reason"], folder, name)
    return folder + name


def list_quarantined(store: Storage) -> list[Quarantined]:
    """Every quarantined object, oldest first."""
    found = []
    keys = [i.key for i in store.list(QUARANTINE_PREFIX)]
    for key in keys:
        folder, _, leaf = key.rpartition("/")
        if leaf == REASON_FILE:
            continue
        try:
            body = json.loads(store.get(f"{folder}/{REASON_FILE}"))
        except (NotFound, ValueError):
            body = {}
        body = body if isinstance(body, dict) else {}
        found.append(Quarantined(key, leaf, str(body.get("reason", "unknown")), str(body.get("when", ""))))
    return found


def expired_superseded(listed: Storage | Iterable[ObjectInfo], age: _dt.timedelta, now: _dt.datetime) -> list[str]:
    """Keys of the superseded manifests moved aside at least ``age`` before ``now``, among the objects
    under ``superseded/`` (``listed``; a store: listed now)."""
    infos = listed.list(SUPERSEDED_PREFIX) if isinstance(listed, Storage) else listed
    return [i.key for i in infos
            if i.key.endswith(".ckpt") and (i.last_modified is None or now - i.last_modified >= age)]


def set_aside_unreadable(store: Storage, problems: dict[str, Exception],
                         reported: set[str]) -> tuple[Exception | None, list[str]]:
    """Quarantine the damaged top-level manifests among ``problems``; report junk and newer formats
    (once per name in ``reported``).  Returns the first problem (the error to raise when nothing
    else restores: fail closed) and the checkpoints skipped."""
    from .errors import CorruptCheckpoint
    from .resolver import damage_kind, junk_advice

    first: Exception | None = None
    skipped: list[str] = []
    for name, error in sorted(problems.items()):
        kind = damage_kind(store, name, error)
        if kind == "damaged":
            quarantine(store, name, str(error))
        elif kind in ("junk", "newer") and name not in reported:
            reported.add(name)
            log.warning("%s", junk_advice(store.url, name) if kind == "junk" else error)
        if kind in ("damaged", "newer"):
            skipped.append(name)
        if kind != "gone":
            first = first or (CorruptCheckpoint(junk_advice(store.url, name)) if kind == "junk" else error)
    return first, skipped
