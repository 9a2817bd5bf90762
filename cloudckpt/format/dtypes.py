"""Tensor dtypes by name, tensor records, and tensors as raw bytes.

A checkpoint stores a tensor as its contiguous bytes in native (little-endian on
every platform torch supports) order plus a :class:`TensorRecord` — dtype name,
shape, device and size.  Nothing here pickles or evaluates anything: a record
read from a file is validated field by field before it is used.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

import torch

from ..errors import CorruptCheckpoint

_STORABLE_NAMES = (
    "bool",
    "uint8", "int8", "int16", "int32", "int64", "uint16", "uint32", "uint64",
    "float16", "bfloat16", "float32", "float64",
    "complex32", "complex64", "complex128",
    "float8_e4m3fn", "float8_e4m3fnuz", "float8_e5m2", "float8_e5m2fnuz", "float8_e8m0fnu",
    "float4_e2m1fn_x2",
)


def _torch_dtype(name: str) -> torch.dtype | None:
    value = getattr(torch, name, None)
    return value if isinstance(value, torch.dtype) else None


#: Every dtype this torch build has, by canonical name (``"float32"``, ``"qint8"``, ...).
ALL_DTYPES: Mapping[str, torch.dtype] = MappingProxyType({
    str(value).removeprefix("torch."): value
    for value in vars(torch).values()
    if isinstance(value, torch.dtype)
})

#: The dtypes whose tensors can be stored as raw bytes, by canonical name.
TENSOR_DTYPES: Mapping[str, torch.dtype] = MappingProxyType({
    name: dtype for name in _STORABLE_NAMES if (dtype := _torch_dtype(name)) is not None
})

_STORABLE = frozenset(TENSOR_DTYPES.values())
_RECORD_KEYS = frozenset({"dtype", "shape", "device", "nbytes"})


def dtype_name(dtype: torch.dtype) -> str:
    """Canonical name of any torch dtype: ``torch.half`` -> ``"float16"``."""
    return str(dtype).removeprefix("torch.")


def is_storable(tensor: torch.Tensor) -> bool:
    """Whether a tensor can be stored as raw bytes: dense (strided) with a dtype of TENSOR_DTYPES."""
    return tensor.layout == torch.strided and tensor.dtype in _STORABLE


@dataclass(frozen=True)
class TensorRecord:
    """What a reader needs to rebuild a tensor from its bytes."""

    dtype: str
    shape: list[int]
    device: str
    nbytes: int

    @property
    def torch_dtype(self) -> torch.dtype:
        """The torch dtype named by :attr:`dtype`."""
        return TENSOR_DTYPES[self.dtype]

    @property
    def numel(self) -> int:
        """Number of elements."""
        return math.prod(self.shape)

    def to_json(self) -> dict[str, Any]:
        """The record as a JSON object."""
        return {"dtype": self.dtype, "shape": list(self.shape), "device": self.device, "nbytes": self.nbytes}

    @classmethod
    def from_json(cls, obj: Any) -> TensorRecord:
        """Parse and validate a record read from a checkpoint; raise CorruptCheckpoint if malformed."""
        if not isinstance(obj, dict) or set(obj) != _RECORD_KEYS:
            raise _bad(f"must be an object with exactly the keys {sorted(_RECORD_KEYS)}")
        record = cls(_dtype_field(obj["dtype"]), _shape_field(obj["shape"]),
                     _device_field(obj["device"]), _count_field(obj["nbytes"], "nbytes"))
        expected = record.numel * TENSOR_DTYPES[record.dtype].itemsize
        if record.nbytes != expected:
            raise _bad(f"nbytes {record.nbytes} != {expected} for {record.dtype} of shape {record.shape}")
        return record


def _bad(message: str) -> CorruptCheckpoint:
    return CorruptCheckpoint(f"tensor record: {message}")


def _count_field(value: Any, what: str) -> int:
    if type(value) is not int or value < 0:
        raise _bad(f"{what} must be a non-negative integer, got {value!r:.60}")
    return value


def _dtype_field(value: Any) -> str:
    if type(value) is not str or value not in TENSOR_DTYPES:
        raise _bad(f"unknown dtype {value!r:.60}")
    return value


def _shape_field(value: Any) -> list[int]:
    if type(value) is not list:
        raise _bad(f"shape must be a list, got {type(value).__name__}")
    return [_count_field(dim, "a dimension") for dim in value]


def _device_field(value: Any) -> str:
    if type(value) is not str:
        raise _bad(f"device must be a string, got {type(value).__name__}")
    try:
        torch.device(value)
    except (RuntimeError, ValueError) as exc:
        raise _bad(f"invalid device {value!r:.60}") from exc
    return value


def _check_storable(tensor: torch.Tensor) -> None:
    if not is_storable(tensor):
        raise TypeError(f"cannot store a {tensor.layout} tensor of dtype {dtype_name(tensor.dtype)} as raw bytes")


def record_of(tensor: torch.Tensor) -> TensorRecord:
    """The record of a tensor (any device); TypeError if it cannot be stored as raw bytes."""
    _check_storable(tensor)
    return TensorRecord(dtype_name(tensor.dtype), list(tensor.shape), str(tensor.device),
                        tensor.numel() * tensor.element_size())


def tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """The bytes of a CPU tensor in row-major order, as a flat ``"B"`` memoryview.

    Zero-copy (the view shares the tensor's memory and keeps it alive) when the
    tensor is contiguous; otherwise — non-contiguous, or with a lazy conjugate or
    negative bit — it first makes a contiguous copy and views that.
    """
    if tensor.device.type != "cpu":
        raise ValueError(f"tensor_bytes needs a CPU tensor, got one on {tensor.device}")
    _check_storable(tensor)
    flat = tensor.detach().resolve_conj().resolve_neg().contiguous().reshape(-1)
    return flat.view(torch.uint8).numpy().data


def empty_from_record(record: TensorRecord, device: str | torch.device = "cpu") -> torch.Tensor:
    """An uninitialised tensor of the record's dtype and shape on ``device`` (not the recorded one)."""
    return torch.empty(record.shape, dtype=record.torch_dtype, device=device)


def tensor_from_bytes(record: TensorRecord, buffer: Any) -> torch.Tensor:
    """A new CPU tensor holding a copy of ``buffer`` (any C-contiguous bytes-like object).

    The length is checked against ``record.nbytes`` before anything is allocated;
    a mismatch raises CorruptCheckpoint.
    """
    source = memoryview(buffer).cast("B")
    if source.nbytes != record.nbytes:
        raise CorruptCheckpoint(f"tensor bytes: got {source.nbytes} bytes, the record says {record.nbytes}")
    tensor = empty_from_record(record)
    tensor_bytes(tensor)[:] = source
    return tensor
