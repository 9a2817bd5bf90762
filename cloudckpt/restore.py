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


def match_destinations(pairs: list[tuple[str, int, torch.Tensor]]) -> dict[int, torch.Tensor]:
    """Map saved tensor index -> live tensor (the first one paired with it, see :func:`pair_tensors`)."""
    found: dict[int, torch.Tensor] = {}
    for _, i, tensor in pairs:
        found.setdefault(i, tensor)
    return found


def pair_tensors(saved: Any, target: Any, tensors: list[torch.Tensor],
                 path: str = "state") -> list[tuple[str, int, torch.Tensor]]:
    """``(path, saved index, live tensor)`` for every place where both trees hold a tensor."""
    pairs: list[tuple[str, int, torch.Tensor]] = []
    _walk(saved, target, tensors, pairs, path)
    return pairs


def check_shapes(pairs: list[tuple[str, int, torch.Tensor]], saved_shapes: list[tuple[int, ...]]) -> None:
    """StateMismatch for the first live tensor whose shape differs from the saved one (before any read)."""
    for path, i, tensor in pairs:
        if 0 <= i < len(saved_shapes) and tuple(tensor.shape) != tuple(saved_shapes[i]):
            raise StateMismatch(f"{path}: the checkpoint holds a tensor of shape {tuple(saved_shapes[i])}, "
                                f"the live one has shape {tuple(tensor.shape)}; nothing was restored")


def _walk(saved: Any, target: Any, tensors: list[torch.Tensor], found: list[tuple[str, int, torch.Tensor]],
          path: str) -> None:
    if isinstance(saved, dict) and isinstance(target, dict):
        if "__tensor__" in saved and "__tensor__" in target:
            i, j = saved["__tensor__"], target["__tensor__"]
            if isinstance(i, int) and isinstance(j, int) and 0 <= j < len(tensors):
                found.append((path, i, tensors[j]))
            return
        for tag in ("__state_dict__", "__tuple__"):
            if tag in saved and tag in target:
                _walk(saved[tag], target[tag], tensors, found, path)
                return
        if "__dict__" in saved and "__dict__" in target:
            _walk(_pairs(saved["__dict__"]), _pairs(target["__dict__"]), tensors, found, path)
            return
        for key, value in saved.items():
            if key in target:
                _walk(value, target[key], tensors, found, f"{path}[{key!r}]")
    elif isinstance(saved, list) and isinstance(target, list):
        for n, (s, t) in enumerate(zip(saved, target)):
            _walk(s, t, tensors, found, f"{path}[{n}]")


def _pairs(pairs: Any) -> dict[str, Any]:
    if not isinstance(pairs, list):
        return {}
    return {json.dumps(p[0], sort_keys=True): p[1] for p in pairs if isinstance(p, list) and len(p) == 2}


def check_loadable(target: Mapping[str, Any], loaded: Mapping[str, Any], *, path: str = "state") -> None:
    """Raise StateMismatch where :func:`apply_state` (or a ``load_state_dict`` it calls) would fail,
    so that the check runs before anything live is touched.

    Modules must have the same keys (strict loading) and shapes; optimizers the same parameter groups.
    """
    for key, value in loaded.items():
        where = f"{path}[{key!r}]"
        if key not in target:
            continue
        current = target[key]
        if hasattr(current, "load_state_dict") and callable(current.load_state_dict):
            _check_stateful(current, value, where)
            # Only torch's own loaders are known well enough to predict (a subclass may override them).
            if type(current).load_state_dict is torch.nn.Module.load_state_dict:
                _check_module(current, value, where)
            elif type(current).load_state_dict is torch.optim.Optimizer.load_state_dict:
                _check_optimizer(current, value, where)
        elif isinstance(current, torch.Tensor) and isinstance(value, torch.Tensor):
            _check_tensor(current, value, where)
        elif isinstance(current, Mapping) and isinstance(value, Mapping) and not isinstance(value, StateDict):
            check_loadable(current, value, path=where)


def _check_stateful(current: Any, value: Any, where: str) -> None:
    if not isinstance(value, StateDict):
        raise StateMismatch(f"{where}: the checkpoint holds a {type(value).__name__}, "
                            f"not the state of a {type(current).__name__}")


def _check_tensor(current: torch.Tensor, value: torch.Tensor, where: str) -> None:
    if current.shape != value.shape:
        raise StateMismatch(f"{where}: the checkpoint holds a tensor of shape {tuple(value.shape)}, "
                            f"the live one has shape {tuple(current.shape)}")


def _check_module(module: torch.nn.Module, saved: Mapping[str, Any], where: str) -> None:
    live = module.state_dict()
    missing, unexpected = sorted(set(live) - set(saved)), sorted(set(saved) - set(live))
    if missing or unexpected:
        raise StateMismatch(f"{where}: the checkpoint's {type(module).__name__} state lacks {missing[:5]} "
                            f"and has {unexpected[:5]} that the live module does not; nothing was restored")
    for name, tensor in live.items():
        value = saved[name]
        if isinstance(value, torch.Tensor) and value.shape != tensor.shape:
            raise StateMismatch(f"{where}[{name!r}]: the checkpoint holds shape {tuple(value.shape)}, "
                                f"the live module {tuple(tensor.shape)}; nothing was restored")


def _check_optimizer(optimizer: torch.optim.Optimizer, saved: Mapping[str, Any], where: str) -> None:
    groups = saved.get("param_groups")
    sizes = [len(g.get("params", ())) for g in groups] if isinstance(groups, list) and all(
        isinstance(g, Mapping) for g in groups) else None
    live = [len(g["params"]) for g in optimizer.param_groups]
    if sizes != live:
        raise StateMismatch(f"{where}: the checkpoint's optimizer has parameter groups of sizes {sizes}, "
                            f"the live one {live}; nothing was restored")


def apply_state(target: MutableMapping[str, Any], loaded: Mapping[str, Any], *, path: str = "state") -> None:
    """Load ``loaded`` into ``target``: stateful objects via ``load_state_dict``, tensors by copy."""
    for key, value in loaded.items():
        where = f"{path}[{key!r}]"
        if key not in target:
            target[key] = value
            continue
        current = target[key]
        if hasattr(current, "load_state_dict") and callable(current.load_state_dict):
            _check_stateful(current, value, where)
            current.load_state_dict(dict(value))
        elif isinstance(current, torch.Tensor) and isinstance(value, torch.Tensor):
            _check_tensor(current, value, where)
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
