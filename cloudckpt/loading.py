"""Reading one parsed manifest back into new plain objects (restoring into live objects in place
is :mod:`cloudckpt.transaction`).

No fallback and no choice of checkpoint here: :mod:`cloudckpt.resolver` decides which
manifest to read, the manager tries the candidates in turn and calls these functions.
"""

from __future__ import annotations

from typing import Any

import torch

from .errors import CorruptCheckpoint
from .format.manifest import Manifest
from .format.serialize import StateDict, unflatten
from .reader import read_tensors
from .storage import Storage
from .transfer import TransferConfig


def load_state(store: Storage, manifest: Manifest, *, transfer: TransferConfig, allow_pickle: bool,
               map_location: str | torch.device | None = None) -> dict[str, Any]:
    """The whole state of ``manifest`` as new objects (state dicts stay :class:`StateDict`)."""
    if not isinstance(manifest.state, dict):
        raise CorruptCheckpoint(f"{store.url}/{manifest.name}: state tree is not an object")
    tensors, _ = read_tensors(store, manifest, {}, transfer)
    if map_location is not None:
        tensors = {i: t.to(map_location) for i, t in tensors.items()}
    return _unflatten(store, manifest, manifest.state, [tensors[i] for i in range(len(manifest.tensors))],
                      allow_pickle)


def _unflatten(store: Storage, manifest: Manifest, tree: Any, tensors: list[torch.Tensor],
               allow_pickle: bool) -> Any:
    try:
        return unflatten(tree, tensors, allow_pickle=allow_pickle)
    except CorruptCheckpoint as exc:
        raise CorruptCheckpoint(f"{store.url}/{manifest.name}: {exc}") from exc


def plain(value: Any) -> Any:
    """``value`` with every :class:`StateDict` turned into a plain dict."""
    if isinstance(value, (StateDict, dict)):
        return {k: plain(v) for k, v in value.items()}
    return value
