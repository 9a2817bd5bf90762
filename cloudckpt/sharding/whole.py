"""A distributed (parts) checkpoint read whole by one process: for evaluation, export, inspection.

``CheckpointManager.load()`` / ``restore()`` call :func:`load_whole_state` for a
manifest that lists parts: every resharded entry comes back as full tensors
(the shards of all ranks put together by DCP's planner), a saved module as
its state dict (``restore`` loads it into a plain ``nn.Module``), and the
per-rank entries as a list, index = rank, under :data:`RANKS_KEY`.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch

from ..errors import CorruptCheckpoint
from ..format.manifest import Manifest
from ..format.serialize import StateDict, unflatten
from ..storage import Storage
from ..transfer import TransferConfig
from .load import load_whole
from .part import PartSource

#: The per-rank states of a distributed checkpoint read whole (a list, index = rank).
RANKS_KEY = "cloudckpt_ranks"
#: Key of the manifest's ``config`` describing the distributed save.
CONFIG_KEY = "cloudckpt_distributed"


def load_whole_state(store: Storage, manifest: Manifest, transfer: TransferConfig, *, keys: set[str] | None = None,
                     allow_pickle: bool = False, map_location: str | torch.device | None = None) -> dict[str, Any]:
    """The checkpoint's state, every tensor whole, in one process (see the module docstring)."""
    where = f"{store.url}/{manifest.name}"
    described = manifest.config.get(CONFIG_KEY)
    kinds = described.get("resharded") if isinstance(described, dict) else None
    if not isinstance(kinds, dict):
        raise CorruptCheckpoint(f"{where}: the manifest lists parts but does not describe the distributed save")
    resharded, ranks = load_whole(store, manifest, transfer, keys=keys)
    state: dict[str, Any] = {}
    for key, value in resharded.items():
        state[key] = StateDict(value) if kinds.get(key) in ("module", "stateful") and isinstance(value, dict) else value
    if keys is None or RANKS_KEY in keys or any(k in keys for k in described.get("per_rank", [])):
        per_rank = []
        for own, tensors in ranks:
            try:
                per_rank.append(unflatten(own.state, tensors, allow_pickle=allow_pickle))
            except CorruptCheckpoint as exc:
                raise CorruptCheckpoint(f"{where}: {exc}") from exc
        state[RANKS_KEY] = per_rank
    return _to(state, map_location) if map_location is not None else state


def _to(value: Any, device: str | torch.device) -> Any:
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, StateDict):
        return StateDict({k: _to(v, device) for k, v in value.items()})
    if isinstance(value, dict):
        return {k: _to(v, device) for k, v in value.items()}
    if isinstance(value, list):
        return [_to(v, device) for v in value]
    return value


def with_part_chunks(store: Storage, manifest: Manifest) -> Manifest:
    """``manifest`` with every chunk its parts list (to verify them all)."""
    chunks = {c.key: c for c in manifest.chunks}
    for part in PartSource(store, manifest).fetch(range(len(manifest.parts or ()))):
        chunks.update((c.key, c) for c in part.chunks)
    return replace(manifest, chunks=list(chunks.values()))
