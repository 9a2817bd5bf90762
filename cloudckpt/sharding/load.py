"""Loading a parts checkpoint: into live (possibly resharded) state on one rank, or whole into one process.

A rank plans its reads with DCP's load planner over the metadata of the parts
it fetched, and fetches only the parts it is likely to need first: at the
world size the checkpoint was saved at, the part of the rank that wrote its
shard and those of the ranks that own the replicated entries it loads.  If
the plan does not cover every element of its targets (another world size, a
different mesh), it fetches every part and plans again.  The planner, not
cloudckpt, works out which stored block overlaps which destination block.
"""

from __future__ import annotations

import logging
import math
from collections import defaultdict
from typing import Any

import torch
from torch.distributed.checkpoint.metadata import BytesStorageMetadata, Metadata
from torch.distributed.checkpoint.planner import LoadItemType, LoadPlan
from torch.distributed.tensor import DTensor

try:
    from torch.distributed.checkpoint._nested_dict import flatten_state_dict, unflatten_state_dict
except ImportError:  # pragma: no cover
    from torch.distributed.checkpoint.utils import flatten_state_dict, unflatten_state_dict  # type: ignore

from ..restore import StateMismatch
from ..format.manifest import Manifest
from ..integrations._dcp_io import ItemReader
from ..reader import read_tensors
from ..storage import Storage
from ..transfer import TransferConfig
from .part import PartSource, empty_like_metadata, merge_metadata
from .planners import JsonLoadPlanner, dtensor_writer, writer_of_replicated

log = logging.getLogger(__name__)


class StateNotInCheckpoint(StateMismatch):
    """The state to restore has entries (or element ranges) that the checkpoint does not hold (not damage:
    restoring an older checkpoint would not help)."""


def likely_parts(state_dict: dict[str, Any], world_size: int, saved_world_size: int, rank: int) -> set[int]:
    """The parts a rank probably needs: part 0 (plain values, small replicated tensors), the writers of the
    large replicated tensors it loads, and for each DTensor shard the saved ranks whose shards overlap it.
    At the saving world size and mesh that is the rank that wrote the same shard; at another one, the
    guess assumes FSDP's layout (dim 0 split as ``torch.chunk`` does over the saving ranks).  The plan's
    coverage check catches a wrong guess."""
    flat, _ = flatten_state_dict(state_dict)
    wanted = {0, rank % saved_world_size}
    for fqn, value in flat.items():
        if not isinstance(value, DTensor):
            wanted.add(writer_of_replicated(fqn, value, saved_world_size))
        elif world_size == saved_world_size:
            writer = dtensor_writer(value)
            if writer is not None:
                wanted.add(writer % saved_world_size)
        else:
            wanted.update(_dim0_overlaps(value, saved_world_size))
    return wanted


def _dim0_overlaps(value: DTensor, saved_world_size: int) -> range:
    chunks = value.__create_chunk_list__()
    if value.dim() == 0 or not chunks or value.shape[0] == 0:
        return range(0)
    start, length = chunks[0].offsets[0], chunks[0].sizes[0]
    per = math.ceil(value.shape[0] / saved_world_size)
    return range(start // per, min(saved_world_size, math.ceil((start + length) / per)))


def load_into(store: Storage, source: PartSource, state_dict: dict[str, Any], *, rank: int, world_size: int,
              transfer: TransferConfig, fill: set[str] = frozenset(), full_verify: bool = False) -> int:
    """Load the DCP state dict ``state_dict`` in place from the checkpoint; return how many parts were read.

    Tensors load into the tensors ``state_dict`` holds (DCP's rule); plain values under the top-level
    keys ``fill`` are loaded whether or not the target holds them (a progress dict given as ``{}``).
    """
    where = f"{store.url}/{source.manifest.name}"
    ranks = likely_parts(state_dict, world_size, source.world_size, rank)
    while True:
        metadata = merge_metadata(source.fetch(ranks), where)
        planner = JsonLoadPlanner()
        planner.set_up_planner(state_dict, metadata, is_coordinator=rank == 0)
        _add_plain_values(planner, source.fetch({0})[0].metadata, fill)
        try:
            plan = planner.create_local_plan()
            gaps = _uncovered(planner.state_dict, plan, metadata)
        except RuntimeError:  # DCP: "Missing key in checkpoint state_dict"
            gaps = sorted(fqn for fqn in planner.state_dict if fqn not in metadata.state_dict_metadata)
            if not gaps:
                raise
        if not gaps:
            break
        if len(ranks) == source.world_size:
            raise StateNotInCheckpoint(f"{where}: the checkpoint does not hold {gaps[:5]} (saved entries: "
                                       f"{sorted(metadata.state_dict_metadata)[:10]} ...)")
        log.info("%s: rank %d needs more than parts %s (%s); reading all %d", where, rank, sorted(ranks)[:8],
                 gaps[:3], source.world_size)
        ranks = set(range(source.world_size))
    plan = planner.finish_plan(planner.create_global_plan([plan])[0])
    ItemReader(store, transfer, full_verify=full_verify).read(plan.items, metadata.storage_data, planner, where)
    return len(ranks)


def _add_plain_values(planner: JsonLoadPlanner, first: Metadata, fill: set[str]) -> None:
    """Plan the plain values (all in part 0) under the keys ``fill`` that the target does not hold yet."""
    mappings = first.planner_data or {}
    for fqn, md in first.state_dict_metadata.items():
        path = tuple(mappings.get(fqn, (fqn,)))
        if isinstance(md, BytesStorageMetadata) and path[0] in fill and fqn not in planner.state_dict:
            planner.state_dict[fqn] = None
            planner.mappings[fqn] = path


def _uncovered(flat: dict[str, Any], plan: LoadPlan, metadata: Metadata) -> list[str]:
    """Target entries the plan does not fill completely (a plan covers only what the fetched parts hold)."""
    covered: dict[str, int] = defaultdict(int)
    for item in plan.items:
        covered[item.dest_index.fqn] += 1 if item.type == LoadItemType.BYTE_IO else math.prod(item.lengths)
    gaps = []
    for fqn, value in flat.items():
        if isinstance(value, DTensor):
            if value.device_mesh.get_coordinate() is None:
                continue
            need = value.to_local().numel()
        elif isinstance(value, torch.Tensor):
            need = value.numel()
        else:
            need = 1 if isinstance(metadata.state_dict_metadata.get(fqn), BytesStorageMetadata) else 0
            if fqn not in metadata.state_dict_metadata:
                need = 1
        if covered[fqn] < need:
            gaps.append(fqn)
    return gaps


def load_whole(store: Storage, manifest: Manifest, transfer: TransferConfig, *, keys: set[str] | None = None,
               full_verify: bool = False) -> tuple[dict[str, Any], list[Any]]:
    """Every resharded entry as full tensors and values (top-level ``keys`` only, if given), and each rank's
    per-rank state tree with its tensors (``(tree, tensors)`` per rank), in one process."""
    source = PartSource(store, manifest)
    where = f"{store.url}/{manifest.name}"
    metadata = merge_metadata(source.fetch(range(source.world_size)), where)
    mappings = metadata.planner_data or {}
    flat: dict[str, Any] = {}
    for fqn, md in metadata.state_dict_metadata.items():
        path = mappings.get(fqn, (fqn,))
        if keys is not None and path[0] not in keys:
            continue
        flat[fqn] = None if isinstance(md, BytesStorageMetadata) else empty_like_metadata(md)
    planner = JsonLoadPlanner(flatten_state_dict=False)
    planner.set_up_planner(flat, metadata, is_coordinator=True)
    plan = planner.create_local_plan()
    ItemReader(store, transfer, full_verify=full_verify).read(plan.items, metadata.storage_data, planner, where)
    nested = unflatten_state_dict(planner.state_dict, {fqn: mappings.get(fqn, (fqn,)) for fqn in flat})
    ranks = []
    for part in source.fetch(range(source.world_size)):
        tensors, _ = read_tensors(store, part.own, {}, transfer)
        ranks.append((part.own, [tensors[i] for i in range(len(part.own.tensors))]))
    return nested, ranks
