"""The run's index file, ``.cloudckpt/state.json``: what must survive a restart besides checkpoints.

* ``checkpoints``: a summary of each committed checkpoint (a cache; manifests are the truth);
* ``best_history``: the top-K values per monitored metric;
* ``pinned``: checkpoints retention must keep;
* ``unreferenced_since``: when the sweeper first saw each garbage chunk unreferenced.

Every change goes through a compare-and-swap of the whole object
(:func:`cloudckpt.pointers.update_json`).  The file may have been written by
anyone, so every field is type-checked on use and a malformed field is
rebuilt rather than trusted.
"""

from __future__ import annotations

import datetime as _dt
import logging
import math
from typing import Any

from .format.manifest import Manifest

log = logging.getLogger(__name__)

VERSION = 1


def _field(body: dict[str, Any], key: str, kind: type) -> Any:
    value = body.get(key)
    if not isinstance(value, kind):
        if value is not None:
            log.warning(".cloudckpt/state.json: %r is a %s, not a %s; rebuilding it",
                        key, type(value).__name__, kind.__name__)
        value = body[key] = kind()
    return value


def record(body: dict[str, Any], manifest: Manifest, *, monitor: str | None, mode: str, top_k: int) -> dict[str, Any]:
    """Add a committed checkpoint to the index and, if it has the monitored metric, to the best history."""
    _field(body, "checkpoints", dict)[manifest.name] = {
        "step": manifest.step, "epoch": manifest.epoch, "reason": manifest.reason,
        "created": manifest.created, "nbytes": manifest.nbytes,
        "metrics": {k: v for k, v in manifest.metrics.items() if v is not None and math.isfinite(v)},
    }
    value = manifest.metrics.get(monitor) if monitor else None
    if monitor and value is not None and math.isfinite(value):
        histories = _field(body, "best_history", dict)
        history = [h for h in histories.get(monitor, []) if _is_entry(h)] if isinstance(
            histories.get(monitor), list) else []
        history.append({"name": manifest.name, "step": manifest.step, "epoch": manifest.epoch, "value": value})
        sign = 1 if mode == "min" else -1
        history.sort(key=lambda h: (sign * h["value"], h["step"]))
        histories[monitor] = history[:top_k]
    body["version"] = VERSION
    return body


def _is_entry(entry: Any) -> bool:
    return (isinstance(entry, dict) and isinstance(entry.get("value"), (int, float))
            and isinstance(entry.get("step"), int))


def forget(body: dict[str, Any], names: set[str]) -> dict[str, Any]:
    """Drop removed checkpoints from the index and the pins.  The best history keeps them: it is
    the record of the run's best values, whether or not their checkpoints were kept."""
    index = _field(body, "checkpoints", dict)
    for name in names:
        index.pop(name, None)
    if body.get("pinned") is not None:
        body["pinned"] = sorted(pins(body) - names)
    return body


def pins(body: dict[str, Any]) -> set[str]:
    value = body.get("pinned")
    return {p for p in value if isinstance(p, str)} if isinstance(value, list) else set()


def set_pin(body: dict[str, Any], name: str, pinned: bool) -> dict[str, Any]:
    current = pins(body)
    body["pinned"] = sorted(current | {name} if pinned else current - {name})
    return body


def unreferenced_since(body: dict[str, Any], keys: set[str], now: _dt.datetime) -> dict[str, _dt.datetime]:
    """When each of ``keys`` was first seen unreferenced (now, for those seen for the first time).

    Keys not in ``keys`` any more (referenced again, or deleted) are dropped.
    """
    seen = _field(body, "unreferenced_since", dict)
    since: dict[str, _dt.datetime] = {}
    for key in keys:
        try:
            since[key] = _dt.datetime.fromisoformat(seen[key])
            if since[key].tzinfo is None:
                raise ValueError("naive timestamp")
        except (KeyError, TypeError, ValueError):
            since[key] = now
    body["unreferenced_since"] = {key: when.isoformat() for key, when in sorted(since.items())}
    return since
