"""Restore one checkpoint into live objects as a transaction: all of the state, or none of it.

The order is what makes it one:

1. Before any read: the entries asked for exist, every live tensor paired with
   a saved one has its shape, and every chunk exists with its declared size
   (a HEAD, unless the read itself checks it: see
   :func:`~cloudckpt.staged_read.stage_tensors`).
2. Every chunk is read and verified into bounded staging memory
   (:func:`~cloudckpt.staged_read.stage_tensors`); no live tensor is written.
3. The state tree is decoded, and what ``load_state_dict`` would refuse (a
   module's keys and shapes, an optimizer's parameter groups, a plain tensor's
   shape) is checked against the decoded values.
4. The RNG state is loaded (the old one is kept to put back), then the staged
   bytes are copied into the live tensors, then each object's
   ``load_state_dict`` runs and plain values are set.

A failure in steps 1-3, or in loading the RNG, leaves every live object as it
was.  Step 4 copies memory; above the staging budget it reads the chunks a
second time, and only a storage failure there can leave a mix
(:class:`~cloudckpt.errors.PartialRestore`, which says so).
"""

from __future__ import annotations

from typing import Any, MutableMapping

import torch

from .errors import CorruptCheckpoint
from .format.manifest import Manifest
from .format.serialize import flatten, unflatten
from .restore import apply_state, check_loadable, check_shapes, match_destinations, pair_tensors, select
from .staged_read import stage_tensors
from .state import RNG_KEY, RNGState
from .storage.base import Storage
from .transfer import TransferConfig

_ABSENT: Any = torch.empty(0)


def restore_checkpoint(
    store: Storage,
    manifest: Manifest,
    state: MutableMapping[str, Any],
    transfer: TransferConfig,
    *,
    keys: list[str] | None = None,
    map_location: str | torch.device | None = None,
    restore_rng: bool = True,
    allow_pickle: bool = False,
) -> None:
    """Restore ``manifest`` into ``state`` in place, all or nothing (see the module doc).

    ``keys`` restores only those entries; the RNG state (when the checkpoint has one and
    ``restore_rng``) only when all of ``state`` is restored.
    """
    where = f"{store.url}/{manifest.name}"
    saved_tree = manifest.state
    if not isinstance(saved_tree, dict):
        raise CorruptCheckpoint(f"{where}: state tree is not an object")
    chosen = select(state, keys, saved_tree, where)
    wanted = set(chosen) | ({RNG_KEY} if restore_rng and keys is None and RNG_KEY in saved_tree else set())
    subtree = {k: v for k, v in saved_tree.items() if k in wanted}
    live = flatten(chosen, allow_pickle=True)
    indices = tensor_indices(subtree)
    unknown = sorted(i for i in indices if not 0 <= i < len(manifest.tensors))
    if unknown:
        raise CorruptCheckpoint(f"{where}: the state tree refers to tensor {unknown[0]}, "
                                f"but the manifest lists {len(manifest.tensors)} tensors")
    pairs = pair_tensors(subtree, live.tree, live.tensors)
    destinations = {} if map_location is not None else match_destinations(pairs)

    staged = stage_tensors(store, manifest, destinations, transfer, only=indices,
                           before_reading=lambda: check_shapes(pairs, [t.shape for t in manifest.tensors]))
    try:
        tensors = staged.tensors
        if map_location is not None:
            tensors = {i: t.to(map_location) for i, t in tensors.items()}
        table = [tensors.get(i, _ABSENT) for i in range(len(manifest.tensors))]
        try:
            loaded = unflatten(subtree, table, allow_pickle=allow_pickle)
        except CorruptCheckpoint as exc:
            raise CorruptCheckpoint(f"{where}: {exc}") from exc
        rng = loaded.pop(RNG_KEY, None)
        values = {k: loaded[k] for k in chosen}
        check_loadable(state, values)
        rng_before = _load_rng(rng, where)
    except BaseException:
        staged.release()
        raise
    try:
        staged.commit()
        apply_state(state, values)
    except BaseException:
        if rng_before is not None:
            RNGState().load_state_dict(rng_before)
        raise


def _load_rng(rng: Any, where: str) -> dict[str, Any] | None:
    """Load the checkpoint's RNG state; return the one it replaced (None if there was nothing to load)."""
    if rng is None:
        return None
    before = RNGState().state_dict()
    try:
        RNGState().load_state_dict(dict(rng))
    except Exception as exc:
        RNGState().load_state_dict(before)
        raise CorruptCheckpoint(f"{where}: the saved RNG state does not load ({type(exc).__name__}: {exc}); "
                                "nothing was restored") from exc
    return before


def tensor_indices(tree: Any) -> set[int]:
    """The tensor-table indices a state tree refers to."""
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
