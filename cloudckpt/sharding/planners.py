"""DCP's default planners, with plain values stored as JSON (never pickles) and writes split without a gather.

``torch.distributed.checkpoint`` stores each non-tensor value as ``torch.save``
output and loads it with ``torch.load(weights_only=False)``.  These planners
store it as cloudckpt's JSON tree instead (tuples, non-finite floats, numpy
scalars ... survive; a value that is not plain data is refused when saving),
and load it back without running code.

DCP also decides which rank writes a replicated item by gathering every rank's
plan to one coordinator.  :func:`owned_items` decides locally instead, the same
way on every rank: a shard of a DTensor is written by the rank at coordinate 0
of every mesh dimension it is replicated over; a plain value or a replicated
tensor under 1 MiB (an optimizer's step counter) by rank 0, so that a reader
finds all of them in one part; a larger replicated tensor (a DDP model's
weights) by ``crc32(fqn) % world_size``, which spreads the writing.
"""

from __future__ import annotations

import io
import json
import zlib
from typing import Any

import torch
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner, DefaultSavePlanner
from torch.distributed.checkpoint.planner import ReadItem, WriteItem, WriteItemType
from torch.distributed.tensor import DTensor

try:  # where torch keeps it (private, stable since 2.1)
    from torch.distributed.checkpoint._traverse import set_element
except ImportError:  # pragma: no cover
    from torch.distributed.checkpoint.utils import set_element  # type: ignore[no-redef]

from ..errors import CorruptCheckpoint

#: Replicated tensors this large are spread over the ranks (by name); smaller ones, and plain values, go
#: to rank 0, whose part every reader fetches anyway.
SPREAD_BYTES = 1 << 20
from ..format.serialize import UnsupportedValue, flatten, unflatten


def encode_value(value: Any, fqn: str) -> bytes:
    """A non-tensor leaf of a DCP state dict as cloudckpt JSON; UnsupportedValue if it is not plain data."""
    flat = flatten(value, allow_pickle=False)
    if flat.tensors:
        raise UnsupportedValue(f"{fqn}: a value mixing tensors into non-tensor containers cannot be resharded; "
                               "keep tensors in dicts (or lists of tensors only)")
    return json.dumps(flat.tree, separators=(",", ":"), allow_nan=False).encode()


def decode_value(data: bytes, fqn: str) -> Any:
    try:
        tree = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise CorruptCheckpoint(f"{fqn}: stored value is not valid JSON ({exc})") from exc
    return unflatten(tree, [], allow_pickle=False)


class JsonSavePlanner(DefaultSavePlanner):
    """DefaultSavePlanner whose BYTE_IO items are JSON."""

    def transform_object(self, write_item: WriteItem, object: Any) -> Any:  # noqa: A002 (DCP's name)
        if write_item.type == WriteItemType.BYTE_IO:
            return io.BytesIO(encode_value(object, write_item.index.fqn))
        return object


class JsonLoadPlanner(DefaultLoadPlanner):
    """DefaultLoadPlanner that reads BYTE_IO items as JSON written by :class:`JsonSavePlanner`."""

    def load_bytes(self, read_item: ReadItem, value: io.BytesIO) -> None:
        fqn = read_item.dest_index.fqn
        decoded = decode_value(value.getvalue(), fqn)
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[fqn], decoded)
        else:
            self.state_dict[fqn] = decoded


def owner_rank(fqn: str, world_size: int) -> int:
    """The rank that writes a replicated (non-DTensor) tensor."""
    return zlib.crc32(fqn.encode("utf-8")) % world_size


def writer_of_replicated(fqn: str, value: Any, world_size: int) -> int:
    """Rank 0 for a plain value or a small tensor (every reader fetches part 0 anyway), else a rank by name."""
    if isinstance(value, torch.Tensor) and value.numel() * value.element_size() >= SPREAD_BYTES:
        return owner_rank(fqn, world_size)
    return 0


def dtensor_writer(value: DTensor) -> int | None:
    """The global rank that writes this rank's shard of ``value``: same shard coordinates, 0 on replicated dims."""
    coordinate = value.device_mesh.get_coordinate()
    if coordinate is None:
        return None
    coords = [c if placement.is_shard() else 0 for c, placement in zip(coordinate, value.placements)]
    return int(value.device_mesh.mesh[tuple(coords)])


def owned_items(items: list[WriteItem], flat_state: dict[str, Any], rank: int, world_size: int,
                global_rank: int) -> list[WriteItem]:
    """The planned items this rank (``rank`` of ``world_size`` in its group, ``global_rank`` in the default
    group, which device meshes use) writes; every item is written by exactly one rank."""
    owned = []
    for item in items:
        value = flat_state.get(item.index.fqn)
        if isinstance(value, DTensor):
            if dtensor_writer(value) == global_rank:
                owned.append(item)
        elif writer_of_replicated(item.index.fqn, value, world_size) == rank:
            owned.append(item)
    return owned
