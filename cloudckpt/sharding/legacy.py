"""Distributed checkpoints of earlier releases: one manifest holding every rank's tensor table.

Replicated entries sit at the top of the state tree, each rank's entries in a
list under ``"cloudckpt_ranks"`` (index = rank), and
``config["cloudckpt_distributed"]["world_size"]`` says how many ranks saved.
They restore at that world size only.
"""

from __future__ import annotations

import dataclasses
from collections.abc import MutableMapping
from typing import Any

from ..catalog import CheckpointInfo
from ..errors import CloudCkptError, CorruptCheckpoint
from ..format.manifest import Manifest
from .whole import CONFIG_KEY, RANKS_KEY


class WorldSizeMismatch(CloudCkptError):
    """Per-rank state saved by one number of ranks is being restored by another."""


def restore_legacy(manager: Any, manifest: Manifest, state: MutableMapping[str, Any], *, rank: int,
                   world_size: int, map_location: Any = None, keys: list[str] | None = None) -> CheckpointInfo:
    """Restore this rank's view (the replicated entries and its own) of a checkpoint of an earlier release."""
    where = f"{manager.store.url}/{manifest.name}"
    described = manifest.config.get(CONFIG_KEY)
    saved = manifest.state
    if not isinstance(described, dict) or not isinstance(saved, dict) or not isinstance(saved.get(RANKS_KEY), list):
        raise WorldSizeMismatch(f"{where} was not saved by DistributedCheckpointManager; restore it with "
                                "CheckpointManager")
    ranks = saved[RANKS_KEY]
    if described.get("world_size") != world_size or len(ranks) != world_size:
        raise WorldSizeMismatch(
            f"{where} was saved by {len(ranks)} ranks (by an earlier release, per rank) and is being restored "
            f"by {world_size}; such a checkpoint restores only at the same world size")
    own = ranks[rank]
    if not isinstance(own, dict):
        raise CorruptCheckpoint(f"{where}: the state of rank {rank} is not an object")
    view = {k: v for k, v in saved.items() if k != RANKS_KEY}
    view.update(own)
    manager.restore_manifest(dataclasses.replace(manifest, state=view), state, map_location=map_location, keys=keys)
    return CheckpointInfo.of(manifest)
