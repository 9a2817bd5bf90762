"""Which entries of a training state go through DCP, and how they become (and come back from) DCP state dicts.

An entry is *resharded* through torch.distributed.checkpoint when it holds a
DTensor (FSDP2, tensor parallel) or is named in ``replicated`` (identical on
every rank: a DDP model, a step counter).  Modules and optimizers become DCP
state dicts through ``get_model_state_dict`` / ``get_optimizer_state_dict``
(keys are parameter names, so they mean the same thing at any world size) and
come back through the matching ``set_*`` helpers; other objects with
``state_dict()`` go through ``state_dict``/``load_state_dict``; tensors and
plain values are loaded in place.  Every other entry is *per rank*: stored in
the rank's part with cloudckpt's own format, restored only at the same world
size.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, MutableMapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.tensor import DTensor

#: How a resharded entry is turned into a DCP state dict and back.
KINDS = ("module", "optimizer", "stateful", "value")


def holds_dtensor(value: Any, depth: int = 0) -> bool:
    """Whether ``value`` (a module, optimizer, tensor or container of them) holds a DTensor."""
    if depth > 50:
        return False
    if isinstance(value, DTensor):
        return True
    if isinstance(value, torch.nn.Module):
        return any(isinstance(t, DTensor) for t in (*value.parameters(), *value.buffers()))
    if isinstance(value, torch.optim.Optimizer):
        return any(isinstance(p, DTensor) for group in value.param_groups for p in group["params"])
    if isinstance(value, Mapping):
        return any(holds_dtensor(v, depth + 1) for v in value.values())
    if isinstance(value, (list, tuple)):
        return any(holds_dtensor(v, depth + 1) for v in value)
    return False


def kind_of(value: Any) -> str:
    if isinstance(value, torch.nn.Module):
        return "module"
    if isinstance(value, torch.optim.Optimizer):
        return "optimizer"
    if not isinstance(value, (Mapping, list, tuple, torch.Tensor)) and callable(getattr(value, "state_dict", None)):
        return "stateful"
    return "value"


@dataclass
class Resharded:
    """The resharded entries of a state as one DCP state dict, and how to put a loaded one back."""

    kinds: dict[str, str]
    state_dict: dict[str, Any]
    owners: dict[str, torch.nn.Module] = field(default_factory=dict)  # optimizer key -> its model


def classify(state: Mapping[str, Any], replicated: Iterable[str]) -> tuple[list[str], list[str]]:
    """Split the keys of ``state`` into (resharded, per-rank)."""
    replicated = set(replicated)
    resharded = [k for k, v in state.items() if k in replicated or holds_dtensor(v)]
    return resharded, [k for k in state if k not in resharded]


def to_dcp(state: Mapping[str, Any], keys: Iterable[str]) -> Resharded:
    """The DCP state dict of ``state[k]`` for ``keys`` (modules and optimizers through DCP's helpers)."""
    out = Resharded({}, {})
    for key in keys:
        value = state[key]
        kind = out.kinds[key] = kind_of(value)
        if kind == "module":
            out.state_dict[key] = get_model_state_dict(value)
        elif kind == "optimizer":
            model = out.owners[key] = _model_of(value, state, key)
            out.state_dict[key] = get_optimizer_state_dict(model, value)
        elif kind == "stateful":
            out.state_dict[key] = value.state_dict()
        else:
            out.state_dict[key] = value
    return out


def from_dcp(state: MutableMapping[str, Any], loaded: Resharded) -> None:
    """Hand each loaded DCP state dict back to its object (``set_*_state_dict``, ``load_state_dict``)."""
    for key, kind in loaded.kinds.items():
        value = loaded.state_dict[key]
        if kind == "module":
            set_model_state_dict(state[key], value)
        elif kind == "optimizer":
            set_optimizer_state_dict(loaded.owners[key], state[key], value)
        elif kind == "stateful":
            state[key].load_state_dict(value)
        else:
            state[key] = value  # tensors were loaded in place; plain values are new objects


def _model_of(optimizer: torch.optim.Optimizer, state: Mapping[str, Any], key: str) -> torch.nn.Module:
    params = {id(p) for group in optimizer.param_groups for p in group["params"]}
    for value in state.values():
        if isinstance(value, torch.nn.Module) and params <= {id(p) for p in value.parameters()}:
            return value
    raise ValueError(
        f"state[{key!r}] is an optimizer whose parameters belong to no module of the same state; pass its "
        "model in the same save()/restore() call, so that its state is keyed by parameter names (which is "
        "what lets it load at another world size)")
