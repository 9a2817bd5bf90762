"""Reading one parsed manifest back: into live objects in place, or into new plain objects.

No fallback and no choice of checkpoint here: :mod:`cloudckpt.resolver` decides which
manifest to read, the manager tries the candidates in turn and calls these functions.
"""

from __future__ import annotations

from typing import Any, MutableMapping

import torch

from .errors import CorruptCheckpoint
from .format.manifest import Manifest
from .format.serialize import StateDict, flatten, unflatten
from .reader import read_tensors
from .restore import apply_state, match_destinations, select
from .state import RNG_KEY, RNGState
from .storage import Storage
from .transfer import TransferConfig

_ABSENT: Any = torch.empty(0)


def restore_manifest(store: Storage, manifest: Manifest, state: MutableMapping[str, Any], *,
                     transfer: TransferConfig, capture_rng: bool, allow_pickle: bool,
                     map_location: str | torch.device | None = None, keys: list[str] | None = None) -> None:
    """Load ``manifest`` into the live objects of ``state`` in place (RNG too, for a full restore)."""
    where = f"{store.url}/{manifest.name}"
    saved_tree = manifest.state
    if not isinstance(saved_tree, dict):
        raise CorruptCheckpoint(f"{where}: state tree is not an object")
    chosen = select(state, keys, saved_tree, where)
    restore_rng = capture_rng and keys is None and RNG_KEY in saved_tree
    wanted_keys = set(chosen) | ({RNG_KEY} if restore_rng else set())
    subtree = {k: v for k, v in saved_tree.items() if k in wanted_keys}
    live = flatten(chosen, allow_pickle=True)
    destinations = match_destinations(subtree, live.tree, live.tensors)
    if map_location is not None:
        destinations = {}
    indices = tensor_indices(subtree)
    tensors, _ = read_tensors(store, manifest, destinations, transfer, only=indices)
    if map_location is not None:
        tensors = {i: t.to(map_location) for i, t in tensors.items()}
    table = [tensors.get(i, _ABSENT) for i in range(len(manifest.tensors))]
    loaded = _unflatten(store, manifest, subtree, table, allow_pickle)
    rng = loaded.pop(RNG_KEY, None)
    apply_state(state, {k: loaded[k] for k in chosen})
    if rng is not None:
        RNGState().load_state_dict(dict(rng))


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


def tensor_indices(tree: Any) -> set[int]:
    """Indices of every tensor (and numpy array) the state tree references."""
    found: set[int] = set()

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            index = node.get("__tensor__", node.get("__ndarray__"))
            if isinstance(index, int) and len(node) == 1:
                found.add(index)
                return
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(tree)
    return found


def plain(value: Any) -> Any:
    """``value`` with every :class:`StateDict` turned into a plain dict."""
    if isinstance(value, (StateDict, dict)):
        return {k: plain(v) for k, v in value.items()}
    return value
