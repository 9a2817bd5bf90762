"""Helpers shared by the checkpoint-promise tests (no fixtures here; see conftest.py)."""

from __future__ import annotations

import math
from typing import Any

import torch

from servers import make_store  # noqa: F401  (re-exported for the tests)



def raw_bytes(t: torch.Tensor) -> torch.Tensor:
    """The tensor's values as a flat uint8 tensor (bit patterns: NaNs and -0.0 compare exactly)."""
    flat = t.detach().resolve_conj().resolve_neg().contiguous().reshape(-1)
    return flat.view(torch.uint8)


def assert_same_tensor(actual: Any, expected: torch.Tensor, where: str = "") -> None:
    """Same dtype, shape and bit-identical values."""
    assert isinstance(actual, torch.Tensor), f"{where}: got {type(actual).__name__}"
    assert actual.dtype == expected.dtype, f"{where}: dtype {actual.dtype} != {expected.dtype}"
    assert tuple(actual.shape) == tuple(expected.shape), f"{where}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert torch.equal(raw_bytes(actual), raw_bytes(expected)), f"{where}: values differ"


def assert_same_tree(actual: Any, expected: Any, where: str = "state") -> None:
    """Deep equality of nested dict/list/tuple/tensor/JSON values, tensors bit for bit."""
    if isinstance(expected, torch.Tensor):
        assert_same_tensor(actual, expected, where)
    elif isinstance(expected, dict):
        assert isinstance(actual, dict), f"{where}: got {type(actual).__name__}"
        assert list(actual) == list(expected), f"{where}: keys {list(actual)} != {list(expected)}"
        for key in expected:
            assert_same_tree(actual[key], expected[key], f"{where}[{key!r}]")
    elif isinstance(expected, (list, tuple)):
        assert type(actual) is type(expected), f"{where}: {type(actual).__name__} != {type(expected).__name__}"
        assert len(actual) == len(expected), f"{where}: length {len(actual)} != {len(expected)}"
        for i, (a, e) in enumerate(zip(actual, expected)):
            assert_same_tree(a, e, f"{where}[{i}]")
    elif isinstance(expected, float) and math.isnan(expected):
        assert isinstance(actual, float) and math.isnan(actual), f"{where}: {actual!r} is not nan"
    else:
        assert type(actual) is type(expected) and actual == expected, f"{where}: {actual!r} != {expected!r}"


def tensors_of(tree: Any, where: str = "state") -> dict[str, torch.Tensor]:
    """Every tensor in a nested state, by path."""
    found: dict[str, torch.Tensor] = {}
    if isinstance(tree, torch.Tensor):
        found[where] = tree
    elif isinstance(tree, dict):
        for key, value in tree.items():
            found.update(tensors_of(value, f"{where}[{key!r}]"))
    elif isinstance(tree, (list, tuple)):
        for i, value in enumerate(tree):
            found.update(tensors_of(value, f"{where}[{i}]"))
    return found


def mlp(seed: int, width: int = 16, depth: int = 2) -> torch.nn.Module:
    """A small deterministic MLP."""
    torch.manual_seed(seed)
    layers: list[torch.nn.Module] = []
    for _ in range(depth):
        layers += [torch.nn.Linear(width, width), torch.nn.ReLU()]
    return torch.nn.Sequential(*layers)


def params_of(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}
