"""Put loaded values back into the user's live objects, in place.

Two steps.  :func:`match_destinations` pairs each tensor of a checkpoint with
the live tensor at the same place in the user's state (a module's parameter,
an optimizer's moment buffer), so the reader can write bytes straight into it.
:func:`apply_state` then hands each stateful object its loaded state dict
(``load_state_dict``), copies into plain tensors and sets plain values.
"""

from __future__ import annotations

import json
from typing import Any, Mapping, MutableMapping

import torch

from .errors import CloudCkptError
from .format.serialize import StateDict


class StateMismatch(CloudCkptError, KeyError):
    """The state passed to restore asks for entries the checkpoint does not have."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


def match_destinations(saved: Any, target: Any, target_tensors: list[torch.Tensor]) -> dict[int, torch.Tensor]:
    """Map saved tensor index -> live tensor, walking the saved and the live tree side by side."""
    found: dict[int, torch.Tensor] = {}
    _walk(saved, target, target_tensors, found)
    return found


def _walk(saved: Any, target: Any, tensors: list[torch.Tensor], found: dict[int, torch.Tensor]) -> None:
    if isinstance(saved, dict) and isinstance(target, dict):
        if "__tensor__" in saved and "__tensor__" in target:
            i, j = saved["__tensor__"], target["__tensor__"]
            if isinstance(i, int) and isinstance(j, int) and 0 <= j < len(tensors):
                found.setdefault(i, tensors[j])
            return
        for tag in ("__state_dict__", "__tuple__"):
            if tag in saved and tag in target:
                _walk(saved[tag], target[tag], tensors, found)
                return
        if "__dict__" in saved and "__dict__" in target:
            _walk(_pairs(saved["__dict__"]), _pairs(target["__dict__"]), tensors, found)
            return
        for key, value in saved.items():
            if key in target:
                _walk(value, target[key], tensors, found)
    elif isinstance(saved, list) and isinstance(target, list):
        for s, t in zip(saved, target):
            _walk(s, t, tensors, found)


def _pairs(pairs: Any) -> dict[str, Any]:
    if not isinstance(pairs, list):
        return {}
    return {json.dumps(p[0], sort_keys=True): p[1] for p in pairs if isinstance(p, list) and len(p) == 2}


def apply_state(target: MutableMapping[str, Any], loaded: Mapping[str, Any], *, path: str = "state") -> None:
    """Load ``loaded`` into ``target``: stateful objects via ``load_state_dict``, tensors by copy."""
    for key, value in loaded.items():
        where = f"{path}[{key!r}]"
        if key not in target:
            target[key] = value
            continue
        current = target[key]
        if hasattr(current, "load_state_dict") and callable(current.load_state_dict):
            if not isinstance(value, StateDict):
                raise StateMismatch(f"{where}: the checkpoint holds a {type(value).__name__}, "
                                    f"not the state of a {type(current).__name__}")
            current.load_state_dict(dict(value))
        elif isinstance(current, torch.Tensor) and isinstance(value, torch.Tensor):
            if current.shape != value.shape:
                raise StateMismatch(f"{where}: the checkpoint holds a tensor of shape {tuple(value.shape)}, "
                                    f"the live one has shape {tuple(current.shape)}")
            if current is not value:
                with torch.no_grad():
                    current.copy_(value)
        elif isinstance(current, MutableMapping) and isinstance(value, Mapping) and not isinstance(value, StateDict):
            apply_state(current, value, path=where)
        else:
            target[key] = value


def select(state: Mapping[str, Any], keys: list[str] | None, available: Mapping[str, Any], where: str) -> dict[str, Any]:
    """The entries of ``state`` to restore: all of them, or ``keys``; each must exist in the checkpoint."""
    chosen = dict(state) if keys is None else {k: state[k] for k in keys if k in state}
    if keys is not None:
        unknown = [k for k in keys if k not in state]
        if unknown:
            raise StateMismatch(f"restore(keys=...) names {unknown}, which the state passed in does not have")
    missing = [k for k in chosen if k not in available]
    if missing:
        raise StateMismatch(
            f"{where} has no {missing} (it holds {sorted(available)}); pass keys=[...] to restore a subset"
        )
    return chosen
