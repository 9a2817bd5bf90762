"""Nested training state <-> a JSON tree plus a table of tensors, and the chunk plan of that table.

:func:`flatten` turns the state a user hands to a checkpoint (dicts, lists,
modules, optimizers, tensors, numbers ...) into a JSON-serialisable *tree* and
a list of the tensors it references; :func:`unflatten` reverses it.  Values
JSON cannot express become tagged objects, one key that starts with ``__``:

* ``{"__state_dict__": tree}``: an object with ``state_dict()``, restored as a
  :class:`StateDict`; a ``"__metadata__"`` key beside it keeps the
  ``_metadata`` (per-module versions) torch puts on a module's state dict.
* ``{"__tensor__": i}``: ``tensors[i]``.  Views of the same memory with the same
  offset, shape, strides, dtype and device (tied weights) share one ``i``;
  partly overlapping views are separate entries.
* ``{"__ndarray__": i}``: a numpy array, in the table as ``torch.from_numpy``
  of it (of a native-endian, C-contiguous, writable copy if it is not one).
* ``{"__tuple__": [...]}``: a tuple, ``torch.Size`` or namedtuple.
* ``{"__dict__": [[key, value], ...]}``: a dict with a key that is not a str or
  that starts with ``__``; insertion order is kept.
* ``{"__float__": "nan" | "inf" | "-inf"}``: a non-finite float.
* ``{"__np__": {"dtype": "float32", "value": ...}}``: a numpy bool, int, uint,
  float16/32/64 or complex64/128 scalar, restored as the same numpy type with
  the same value (a float is exact in JSON; a complex is ``[real, imag]``).
* ``{"__bytes__": base64}``, ``{"__dtype__": "bfloat16"}``, ``{"__device__": "cuda:0"}``.
* ``{"__pickle__": base64}``: any other value, only with ``allow_pickle=True``.

Leaves are kept only if they are exactly ``None``, ``bool``, ``int``, ``str`` or
``float``: subclasses (enums) are refused, because their type carries meaning.
Dict, list and tuple subclasses (OrderedDict, namedtuple) become the plain type.
Containers reached twice are stored twice; only tensors are shared.

:func:`plan_chunks` (format/chunking.py, re-exported here) cuts the tensor table
into chunks with boundaries that do not move when an unrelated tensor changes.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import pickle
import reprlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeAlias

import numpy as np
import torch

from ..errors import CloudCkptError, CorruptCheckpoint
from .chunking import ChunkPlan, Segment, Slice, plan_chunks
from .dtypes import (
    ALL_DTYPES,
    TENSOR_DTYPES,
    TensorRecord,
    dtype_name,
    empty_from_record,
    is_storable,
    record_of,
    tensor_bytes,
    tensor_from_bytes,
)

__all__ = [
    "MAX_DEPTH",
    "ChunkPlan",
    "Flattened",
    "Json",
    "PickleNotAllowed",
    "Segment",
    "Slice",
    "StateDict",
    "TensorRecord",
    "UnsupportedValue",
    "empty_from_record",
    "flatten",
    "plan_chunks",
    "record_of",
    "tensor_bytes",
    "tensor_from_bytes",
    "unflatten",
]

Json: TypeAlias = dict[str, "Json"] | list["Json"] | str | int | float | bool | None

#: Deepest nesting flatten accepts and unflatten reads (real training states nest ~10 deep).
MAX_DEPTH = 100
_ROOT = "state"
_HINT = "store tensors, JSON values or objects with state_dict()"
_NON_FINITE = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}
_NUMPY_DTYPES = frozenset({
    "bool", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64",
    "float16", "float32", "float64", "complex64", "complex128",
})


class UnsupportedValue(CloudCkptError, TypeError):
    """The state holds a value the format cannot store (without ``allow_pickle=True``)."""


class PickleNotAllowed(CloudCkptError):
    """The checkpoint holds pickled values and the load did not opt in with ``allow_pickle=True``."""


class StateDict(dict):
    """A restored ``state_dict()``: the restorer should call ``load_state_dict`` with it on the target.

    ``_metadata`` is what torch keeps on a module's state dict (per-submodule
    versions); ``nn.Module.load_state_dict`` reads it, as from the original.
    """

    _metadata: dict[str, Any] | None = None


@dataclass
class Flattened:
    """The state as a JSON tree plus the original tensors it references by index."""

    tree: Json
    tensors: list[torch.Tensor]


def flatten(state: Any, *, allow_pickle: bool = False) -> Flattened:
    """Encode a nested training state as a JSON tree and a table of its (original, uncopied) tensors.

    Raises :class:`UnsupportedValue`, naming the path and the type, for a value
    the format cannot hold, a reference cycle, or nesting deeper than MAX_DEPTH;
    with ``allow_pickle=True`` unsupported values are pickled instead.
    """
    flattener = _Flattener(allow_pickle)
    tree = flattener.encode(state, _ROOT, 0)
    return Flattened(tree, flattener.tensors)


def unflatten(tree: Any, tensors: Sequence[torch.Tensor], *, allow_pickle: bool = False) -> Any:
    """Rebuild the nested state from a tree (untrusted) and the tensor table.

    Every reference to one table entry yields the same tensor object.  Raises
    CorruptCheckpoint, naming the path, for a malformed tree and
    :class:`PickleNotAllowed` for a pickled value unless ``allow_pickle=True``.
    """
    return _Unflattener(tensors, allow_pickle).decode(tree, _ROOT, 0)


def _segment(key: Any) -> str:
    """Path segment of a key: ``["k"]`` for a str, ``[0]`` for an int, ``[repr]`` otherwise."""
    return f"[{json.dumps(key, ensure_ascii=False) if isinstance(key, str) else reprlib.repr(key)}]"


def _encode_float(value: float) -> Json:
    return value if math.isfinite(value) else {"__float__": "nan" if math.isnan(value) else str(value)}


def _has_state_dict(obj: Any) -> bool:
    return not isinstance(obj, type) and callable(getattr(obj, "state_dict", None))


def _view_key(tensor: torch.Tensor) -> tuple[Any, ...] | None:
    try:
        pointer = tensor.untyped_storage().data_ptr()
    except RuntimeError:  # a wrapper subclass without storage of its own: never tied
        return None
    if pointer == 0:  # no memory (empty or meta): nothing to tie
        return None
    return (pointer, tensor.storage_offset(), tuple(tensor.shape), tensor.stride(), tensor.dtype, tensor.device,
            tensor.is_conj(), tensor.is_neg())


def _is_dtensor(obj: Any) -> bool:
    if type(obj) is torch.Tensor or not isinstance(obj, torch.Tensor) or not torch.distributed.is_available():
        return False
    from torch.distributed.tensor import DTensor

    return isinstance(obj, DTensor)


class _Flattener:
    def __init__(self, allow_pickle: bool) -> None:
        self.allow_pickle = allow_pickle
        self.tensors: list[torch.Tensor] = []
        self._index: dict[tuple[Any, ...], int] = {}
        self._open: set[int] = set()  # ids of the containers being encoded, to catch cycles

    def encode(self, obj: Any, path: str, depth: int) -> Json:
        if depth > MAX_DEPTH:
            raise UnsupportedValue(f"{path}: nested deeper than {MAX_DEPTH} levels")
        if obj is None or type(obj) in (bool, int, str):
            return obj
        if type(obj) is float:
            return _encode_float(obj)
        if isinstance(obj, (dict, list, tuple)) or _has_state_dict(obj):
            return self._container(obj, path, depth + 1)
        return self._leaf(obj, path)

    def _leaf(self, obj: Any, path: str) -> Json:
        if _is_dtensor(obj):
            raise UnsupportedValue(
                f"{path}: a DTensor (sharded across ranks: FSDP2, tensor parallel) cannot be saved by one "
                "process; save it with cloudckpt.distributed.DistributedCheckpointManager on every rank "
                "(which reshards through torch.distributed.checkpoint), or gather it with .full_tensor() first")
        if isinstance(obj, torch.Tensor) and is_storable(obj):
            return {"__tensor__": self._add(obj)}
        if type(obj) is np.ndarray and obj.dtype.name in _NUMPY_DTYPES and obj.dtype.name in TENSOR_DTYPES:
            native = np.require(obj, obj.dtype.newbyteorder("="), ["C", "W"])
            return {"__ndarray__": self._add(torch.from_numpy(native))}
        if isinstance(obj, np.generic) and obj.dtype.name in _NUMPY_DTYPES:
            return {"__np__": {"dtype": obj.dtype.name, "value": _numpy_value(obj)}}
        if type(obj) is bytes:
            return {"__bytes__": base64.b64encode(obj).decode("ascii")}
        if isinstance(obj, torch.dtype):
            return {"__dtype__": dtype_name(obj)}
        if isinstance(obj, torch.device):
            return {"__device__": str(obj)}
        return self._fallback(obj, path)

    def _add(self, tensor: torch.Tensor) -> int:
        key = _view_key(tensor)
        if key is not None and key in self._index:
            return self._index[key]
        self.tensors.append(tensor)
        if key is not None:
            self._index[key] = len(self.tensors) - 1
        return len(self.tensors) - 1

    def _container(self, obj: Any, path: str, depth: int) -> Json:
        if id(obj) in self._open:
            raise UnsupportedValue(f"{path}: reference cycle: this {type(obj).__name__} contains itself")
        self._open.add(id(obj))
        try:
            return self._container_body(obj, path, depth)
        finally:
            self._open.discard(id(obj))

    def _container_body(self, obj: Any, path: str, depth: int) -> Json:
        if isinstance(obj, StateDict):
            return self._state_dict_node(obj, path, depth)
        if _has_state_dict(obj):
            return self._state_dict_node(self._call_state_dict(obj, path), path, depth)
        if isinstance(obj, dict):
            return self._dict(obj, path, depth)
        items = [self.encode(item, f"{path}[{i}]", depth) for i, item in enumerate(obj)]
        return {"__tuple__": items} if isinstance(obj, tuple) else items

    @staticmethod
    def _call_state_dict(obj: Any, path: str) -> dict[Any, Any]:
        state = obj.state_dict()
        if not isinstance(state, dict):
            raise UnsupportedValue(
                f"{path}: {type(obj).__name__}.state_dict() returned {type(state).__name__}, not a dict")
        return state

    def _state_dict_node(self, state: dict[Any, Any], path: str, depth: int) -> Json:
        node: dict[str, Json] = {"__state_dict__": self._dict(state, path, depth)}
        metadata = getattr(state, "_metadata", None)
        if metadata is not None:
            node["__metadata__"] = self.encode(metadata, f"{path}._metadata", depth)
        return node

    def _dict(self, obj: dict[Any, Any], path: str, depth: int) -> Json:
        if all(type(key) is str and not key.startswith("__") for key in obj):
            return {key: self.encode(value, path + _segment(key), depth) for key, value in obj.items()}
        return {"__dict__": [
            [self.encode(key, f"{path}{_segment(key)} (the key)", depth),
             self.encode(value, path + _segment(key), depth)]
            for key, value in obj.items()
        ]}

    def _fallback(self, obj: Any, path: str) -> Json:
        if not self.allow_pickle:
            raise UnsupportedValue(f"{path}: unsupported type {type(obj).__name__}; {_HINT}")
        try:
            payload = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
        except Exception as exc:  # pickling raises PicklingError, TypeError, AttributeError ...
            raise UnsupportedValue(f"{path}: cannot pickle {type(obj).__name__}: {exc}") from exc
        return {"__pickle__": base64.b64encode(payload).decode("ascii")}


def _numpy_value(scalar: np.generic) -> Json:
    kind = scalar.dtype.kind
    if kind == "b":
        return bool(scalar)
    if kind in "iu":
        return int(scalar)
    if kind == "f":
        return _encode_float(float(scalar))
    return [_encode_float(float(scalar.real)), _encode_float(float(scalar.imag))]


def _corrupt(path: str, message: str) -> CorruptCheckpoint:
    return CorruptCheckpoint(f"checkpoint tree at {path}: {message}")


def _b64decode(payload: Any, path: str) -> bytes:
    if type(payload) is not str:
        raise _corrupt(path, f"expected a base64 string, got {type(payload).__name__}")
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise _corrupt(path, "invalid base64") from exc


class _Unflattener:
    def __init__(self, tensors: Sequence[torch.Tensor], allow_pickle: bool) -> None:
        self._tensors = tensors
        self._allow_pickle = allow_pickle
        self._tags: dict[str, Callable[[Any, str, int], Any]] = {
            "__tensor__": lambda payload, path, depth: self._tensors[self._index(payload, path)],
            "__ndarray__": self._ndarray,
            "__tuple__": lambda payload, path, depth: tuple(self._list(payload, path, depth)),
            "__dict__": self._pairs,
            "__float__": self._float,
            "__np__": self._numpy,
            "__bytes__": lambda payload, path, depth: _b64decode(payload, path),
            "__dtype__": self._dtype,
            "__device__": self._device,
            "__pickle__": self._pickle,
        }

    def decode(self, node: Any, path: str, depth: int) -> Any:
        if depth > MAX_DEPTH:
            raise _corrupt(path, f"nested deeper than {MAX_DEPTH} levels")
        if node is None or type(node) in (bool, int, float, str):
            return node
        if type(node) is list:
            return self._list(node, path, depth + 1)
        if type(node) is dict:
            return self._dict_node(node, path, depth + 1)
        raise _corrupt(path, f"unexpected {type(node).__name__}")

    def _list(self, payload: Any, path: str, depth: int) -> list[Any]:
        if type(payload) is not list:
            raise _corrupt(path, f"expected a list, got {type(payload).__name__}")
        return [self.decode(item, f"{path}[{i}]", depth) for i, item in enumerate(payload)]

    def _dict_node(self, node: dict[Any, Any], path: str, depth: int) -> Any:
        tags = [key for key in node if type(key) is not str or key.startswith("__")]
        if not tags:
            return {key: self.decode(value, path + _segment(key), depth) for key, value in node.items()}
        if "__state_dict__" in node:
            return self._state_dict(node, path, depth)
        handler = self._tags.get(tags[0]) if len(node) == 1 else None
        if handler is None:
            raise _corrupt(path, f"not a known tagged node: keys {reprlib.repr(list(node))}")
        return handler(node[tags[0]], path, depth)

    def _state_dict(self, node: dict[Any, Any], path: str, depth: int) -> StateDict:
        if not set(node) <= {"__state_dict__", "__metadata__"}:
            raise _corrupt(path, f"a state_dict node has extra keys {reprlib.repr(list(node))}")
        body = self.decode(node["__state_dict__"], path, depth)
        if not isinstance(body, dict):
            raise _corrupt(path, f"a state_dict must be a dict, got {type(body).__name__}")
        result = StateDict(body)
        if "__metadata__" in node:
            metadata = self.decode(node["__metadata__"], f"{path}._metadata", depth)
            if not isinstance(metadata, dict):
                raise _corrupt(path, f"state_dict metadata must be a dict, got {type(metadata).__name__}")
            result._metadata = metadata
        return result

    def _index(self, payload: Any, path: str) -> int:
        if type(payload) is not int or not 0 <= payload < len(self._tensors):
            raise _corrupt(path, f"tensor index {reprlib.repr(payload)} is not in [0, {len(self._tensors)})")
        return payload

    def _ndarray(self, payload: Any, path: str, depth: int) -> np.ndarray:
        tensor = self._tensors[self._index(payload, path)]
        if dtype_name(tensor.dtype) not in _NUMPY_DTYPES:
            raise _corrupt(path, f"a {dtype_name(tensor.dtype)} tensor cannot be a numpy array")
        return tensor.detach().cpu().numpy()

    def _pairs(self, payload: Any, path: str, depth: int) -> dict[Any, Any]:
        result: dict[Any, Any] = {}
        for i, pair in enumerate(self._list_of_pairs(payload, path)):
            key = self.decode(pair[0], f"{path}.keys()[{i}]", depth)
            try:
                duplicate = key in result
            except TypeError as exc:
                raise _corrupt(path, f"entry {i}: a key of unhashable type {type(key).__name__}") from exc
            if duplicate:
                raise _corrupt(path, f"entry {i}: the key {reprlib.repr(key)} appears twice")
            result[key] = self.decode(pair[1], path + _segment(key), depth)
        return result

    @staticmethod
    def _list_of_pairs(payload: Any, path: str) -> list[list[Any]]:
        if type(payload) is not list or not all(type(p) is list and len(p) == 2 for p in payload):
            raise _corrupt(path, "__dict__ must be a list of [key, value] pairs")
        return payload

    def _float(self, payload: Any, path: str, depth: int) -> float:
        if type(payload) is not str or payload not in _NON_FINITE:
            raise _corrupt(path, f"__float__ must be one of {sorted(_NON_FINITE)}, got {reprlib.repr(payload)}")
        return _NON_FINITE[payload]

    def _real(self, node: Any, path: str, depth: int) -> float:
        value = self.decode(node, path, depth)
        if type(value) not in (int, float):
            raise _corrupt(path, f"expected a number, got {type(value).__name__}")
        return float(value)

    def _numpy(self, payload: Any, path: str, depth: int) -> np.generic:
        if (type(payload) is not dict or set(payload) != {"dtype", "value"}
                or type(payload["dtype"]) is not str or payload["dtype"] not in _NUMPY_DTYPES):
            raise _corrupt(path, "__np__ must be {\"dtype\": <numpy scalar dtype>, \"value\": ...}")
        dtype, value = np.dtype(payload["dtype"]), payload["value"]
        if dtype.kind == "b" and type(value) is bool:
            return dtype.type(value)
        if dtype.kind in "iu" and type(value) is int and np.iinfo(dtype).min <= value <= np.iinfo(dtype).max:
            return dtype.type(value)
        if dtype.kind == "f":
            return dtype.type(self._real(value, path, depth))
        if dtype.kind == "c" and type(value) is list and len(value) == 2:
            return dtype.type(complex(self._real(value[0], path, depth), self._real(value[1], path, depth)))
        raise _corrupt(path, f"{reprlib.repr(value)} is not a valid {dtype.name} value")

    def _dtype(self, payload: Any, path: str, depth: int) -> torch.dtype:
        if type(payload) is not str or payload not in ALL_DTYPES:
            raise _corrupt(path, f"unknown dtype {reprlib.repr(payload)}")
        return ALL_DTYPES[payload]

    def _device(self, payload: Any, path: str, depth: int) -> torch.device:
        if type(payload) is not str:
            raise _corrupt(path, f"a device must be a string, got {type(payload).__name__}")
        try:
            return torch.device(payload)
        except (RuntimeError, ValueError) as exc:
            raise _corrupt(path, f"invalid device {reprlib.repr(payload)}") from exc

    def _pickle(self, payload: Any, path: str, depth: int) -> Any:
        if not self._allow_pickle:
            raise PickleNotAllowed(
                f"{path}: this checkpoint holds a pickled value: it was saved with allow_pickle=True and "
                "must be loaded with allow_pickle=True (which runs code from the file: trust its source)")
        data = _b64decode(payload, path)
        try:
            return pickle.loads(data)
        except (pickle.UnpicklingError, EOFError) as exc:
            raise _corrupt(path, f"cannot unpickle: {exc}") from exc


def has_pickled_leaves(tree: Any) -> bool:
    """Whether a flattened tree holds any ``__pickle__`` leaf (saved with ``allow_pickle=True``)."""
    if isinstance(tree, dict):
        return "__pickle__" in tree or any(has_pickled_leaves(v) for v in tree.values())
    if isinstance(tree, list):
        return any(has_pickled_leaves(v) for v in tree)
    return False
