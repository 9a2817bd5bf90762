"""Tests of cloudckpt.format.serialize: state <-> JSON tree + tensor table, tensor records, chunk plans."""

from __future__ import annotations

import enum
import itertools
import json
import math
import pathlib
import pickle
from collections import OrderedDict
from dataclasses import astuple
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from cloudckpt.errors import CloudCkptError, CorruptCheckpoint
from cloudckpt.format.dtypes import ALL_DTYPES, TENSOR_DTYPES
from cloudckpt.format.serialize import (
    MAX_DEPTH,
    ChunkPlan,
    PickleNotAllowed,
    StateDict,
    TensorRecord,
    UnsupportedValue,
    empty_from_record,
    flatten,
    plan_chunks,
    record_of,
    tensor_bytes,
    tensor_from_bytes,
    unflatten,
)

HINT = "store tensors, JSON values or objects with state_dict()"


# --- helpers -------------------------------------------------------------------------------------


def snapshot(tensor: torch.Tensor) -> torch.Tensor:
    """What a writer + reader do to a tensor: record, raw bytes, and back into a new CPU tensor."""
    record = TensorRecord.from_json(json.loads(json.dumps(record_of(tensor).to_json())))
    return tensor_from_bytes(record, bytes(tensor_bytes(tensor.detach().cpu())))


def roundtrip(state: Any, *, allow_pickle: bool = False) -> Any:
    flat = flatten(state, allow_pickle=allow_pickle)
    tree = json.loads(json.dumps(flat.tree, allow_nan=False))
    return unflatten(tree, [snapshot(t) for t in flat.tensors], allow_pickle=allow_pickle)


def assert_same_tensor(actual: torch.Tensor, expected: torch.Tensor) -> None:
    assert type(actual) is torch.Tensor
    assert actual.dtype == expected.dtype
    assert actual.shape == expected.shape
    assert bytes(tensor_bytes(actual)) == bytes(tensor_bytes(expected.detach().cpu()))


def assert_same(actual: Any, expected: Any) -> None:
    """Deep equality that also checks leaf types, NaNs, tensors (bitwise) and numpy values."""
    if isinstance(expected, torch.Tensor):
        assert_same_tensor(actual, expected)
    elif isinstance(expected, np.ndarray):
        assert type(actual) is np.ndarray
        assert actual.dtype == expected.dtype.newbyteorder("=") and actual.shape == expected.shape
        np.testing.assert_array_equal(actual, expected)
    elif isinstance(expected, dict):
        assert isinstance(actual, dict) and list(actual) == list(expected)
        for key in expected:
            assert_same(actual[key], expected[key])
    elif isinstance(expected, (list, tuple)):
        assert type(actual) is (tuple if isinstance(expected, tuple) else list)
        assert len(actual) == len(expected)
        for a, e in zip(actual, expected, strict=True):
            assert_same(a, e)
    else:
        assert type(actual) is type(expected)
        both_nan = isinstance(expected, (float, np.floating)) and math.isnan(expected) and math.isnan(actual)
        assert both_nan or actual == expected


def random_tensor(dtype: torch.dtype, shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    """A tensor of random bit patterns (NaNs included) of any dtype; bools are 0 or 1."""
    generator = torch.Generator().manual_seed(seed)
    numel = math.prod(shape)
    if dtype == torch.bool:
        return torch.randint(0, 2, shape, generator=generator).bool()
    raw = torch.randint(0, 256, (numel * dtype.itemsize,), dtype=torch.uint8, generator=generator)
    return raw.view(dtype).reshape(shape)


# --- dtypes and tensor layouts ----------------------------------------------------------------------

REQUIRED_DTYPES = {
    "float16", "bfloat16", "float32", "float64", "int8", "int16", "int32", "int64", "uint8",
    "uint16", "uint32", "uint64", "bool", "complex64", "complex128",
}


def test_every_named_dtype_is_storable() -> None:
    float8 = {name for name in ALL_DTYPES if name.startswith("float8_")}
    assert REQUIRED_DTYPES | float8 <= set(TENSOR_DTYPES)
    assert all(ALL_DTYPES[name] is dtype for name, dtype in TENSOR_DTYPES.items())


@pytest.mark.filterwarnings("ignore:ComplexHalf support is experimental")
@pytest.mark.parametrize("name", sorted(TENSOR_DTYPES))
def test_every_dtype_round_trips_bitwise(name: str) -> None:
    dtype = TENSOR_DTYPES[name]
    matrix = random_tensor(dtype, (5, 6))
    state = {"matrix": matrix, "transposed": matrix.t(), "scalar": random_tensor(dtype, ()),
             "empty": random_tensor(dtype, (0, 3))}
    restored = roundtrip(state)
    assert_same(restored, state)
    assert restored["transposed"].is_contiguous()


def test_non_contiguous_views_round_trip_by_value() -> None:
    base = torch.arange(60, dtype=torch.float32).reshape(6, 10)
    complex_base = torch.randn(4, 3, dtype=torch.complex64)
    state = {
        "transposed": base.t(),
        "strided": base[::2, 1::3],
        "offset": base[3:, 4:7],
        "expanded": torch.arange(3).expand(4, 3),
        "conj": complex_base.conj(),
        "neg_bit": complex_base.conj().imag,
        "param": nn.Parameter(torch.ones(2, 2)),
    }
    restored = roundtrip(state)
    for key, value in state.items():
        assert_same_tensor(restored[key], value.detach().resolve_conj().resolve_neg().contiguous())


def test_flatten_keeps_the_original_tensors() -> None:
    weight = torch.randn(4, 4)
    view = weight.t()
    flat = flatten({"w": weight, "view": view})
    assert flat.tensors[0] is weight and flat.tensors[1] is view


def test_tied_weights_share_one_table_entry_and_one_restored_tensor() -> None:
    embedding = nn.Embedding(10, 4)
    head = nn.Linear(4, 10, bias=False)
    head.weight = embedding.weight
    model = nn.ModuleDict({"embedding": embedding, "head": head})
    flat = flatten({"model": model, "again": embedding.weight.data, "row": embedding.weight[1:],
                    "transposed": embedding.weight.t()})
    tree: Any = flat.tree
    body = tree["model"]["__state_dict__"]
    index = body["embedding.weight"]["__tensor__"]
    assert body["head.weight"] == {"__tensor__": index}
    assert tree["again"] == {"__tensor__": index}
    assert len({tree[k]["__tensor__"] for k in ("again", "row", "transposed")}) == 3
    assert len(flat.tensors) == 3
    restored = unflatten(flat.tree, [snapshot(t) for t in flat.tensors])
    assert restored["model"]["embedding.weight"] is restored["model"]["head.weight"]
    assert restored["model"]["embedding.weight"] is restored["again"]


def test_zero_size_and_zero_dim_tensors() -> None:
    state = {
        "empty": torch.empty(0),
        "empty_3d": torch.empty(3, 0, 2, dtype=torch.int16),
        "also_empty": torch.empty(0),
        "float": torch.tensor(3.5),
        "bool": torch.tensor(True),
        "long": torch.tensor(-7),
        "bf16": torch.tensor(1.25, dtype=torch.bfloat16),
    }
    restored = roundtrip(state)
    assert_same(restored, state)
    assert restored["float"].dim() == 0
    assert len(tensor_bytes(torch.empty(3, 0))) == 0


# --- real training objects ------------------------------------------------------------------------


def make_training(seed: int) -> tuple[nn.Module, torch.optim.Optimizer, Any, torch.amp.GradScaler]:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 2))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, betas=(0.9, 0.99), weight_decay=0.1)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=2, gamma=0.5)
    return model, optimizer, scheduler, torch.amp.GradScaler("cpu", init_scale=1024.0)


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any,
               scaler: torch.amp.GradScaler, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    loss = model(torch.randn(6, 4, generator=generator)).square().mean()
    optimizer.zero_grad()
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()
    scheduler.step()


def test_module_optimizer_scheduler_scaler_restore_exactly() -> None:
    model, optimizer, scheduler, scaler = make_training(0)
    for step in range(3):
        train_step(model, optimizer, scheduler, scaler, step)
    state = {"model": model, "optimizer": optimizer, "scheduler": scheduler, "scaler": scaler, "step": 3}

    tree: Any = flatten(state).tree
    assert "__dict__" in tree["optimizer"]["__state_dict__"]["state"]  # int keys
    assert tree["optimizer"]["__state_dict__"]["param_groups"][0]["betas"] == {"__tuple__": [0.9, 0.99]}
    restored = roundtrip(state)
    assert all(type(restored[k]) is StateDict for k in ("model", "optimizer", "scheduler", "scaler"))
    assert restored["model"]._metadata == model.state_dict()._metadata  # type: ignore[attr-defined]
    assert_same(restored["optimizer"]["state"][0]["step"], optimizer.state_dict()["state"][0]["step"])

    model2, optimizer2, scheduler2, scaler2 = make_training(1)
    model2.load_state_dict(restored["model"])
    optimizer2.load_state_dict(restored["optimizer"])
    scheduler2.load_state_dict(restored["scheduler"])
    scaler2.load_state_dict(restored["scaler"])
    for original, loaded in ((model, model2), (optimizer, optimizer2), (scheduler, scheduler2), (scaler, scaler2)):
        assert_same(loaded.state_dict(), original.state_dict())

    train_step(model, optimizer, scheduler, scaler, 3)
    train_step(model2, optimizer2, scheduler2, scaler2, 3)
    assert_same(model2.state_dict(), model.state_dict())
    assert_same(optimizer2.state_dict(), optimizer.state_dict())


def test_flatten_of_unflatten_gives_the_same_tree() -> None:
    model, optimizer, scheduler, scaler = make_training(0)
    train_step(model, optimizer, scheduler, scaler, 0)
    flat = flatten({"model": model, "optimizer": optimizer, "scaler": scaler})
    again = flatten(unflatten(flat.tree, flat.tensors))
    assert again.tree == flat.tree
    assert all(a is b for a, b in zip(again.tensors, flat.tensors, strict=True))


# --- plain values ---------------------------------------------------------------------------------


class Color(enum.IntEnum):
    RED = 1


def test_nested_plain_values_round_trip_type_exactly() -> None:
    state = {
        "list": [1, 2.5, -0.0, (3, "x"), {"n": None}, [], ()],
        "floats": [math.nan, math.inf, -math.inf, 1e308, 5e-324],
        "big_int": 2**100,
        "unicode": "grüße ☃ \U0001F600",
        "bytes": b"\x00\xff binary",
        "ordered": OrderedDict([("z", 1), ("a", 2)]),
        "int_keys": {3: "x", 1: "y"},
        "reserved_keys": {"__tensor__": 5, "plain": 1},
        "odd_keys": {(1, "a"): 2, None: 3, 2.5: 4, True: 5, "s": 6},
        "empty": {},
        "size": torch.Size([2, 3]),
        "dtypes": [torch.bfloat16, torch.float8_e4m3fn, torch.qint8, torch.int64],
        "devices": [torch.device("cpu"), torch.device("cuda", 1), torch.device("meta")],
    }
    restored = roundtrip(state)
    expected = dict(state, size=(2, 3))
    assert_same(restored, expected)
    assert type(restored["ordered"]) is dict and type(restored["size"]) is tuple


@pytest.mark.parametrize("value", [
    np.float32(0.1), np.float16(-1.5), np.float64(1 / 3), np.float32(np.nan), np.float64(-np.inf),
    np.int8(-128), np.int64(-(2**63)), np.uint64(2**64 - 1), np.uint8(255), np.bool_(True),
    np.complex64(1.5 - 0.1j), np.complex128(complex(math.inf, -2.0)),
])
def test_numpy_scalars_round_trip_type_exactly(value: np.generic) -> None:
    tree: Any = flatten({"v": value}).tree
    assert tree["v"]["__np__"]["dtype"] == value.dtype.name
    restored = roundtrip({"v": value})["v"]
    assert type(restored) is type(value)
    assert restored.tobytes() == value.tobytes() or (np.isnan(value) and np.isnan(restored))


def test_numpy_arrays_round_trip() -> None:
    matrix = np.arange(12, dtype=np.int32).reshape(3, 4)
    readonly = np.arange(5, dtype=np.float64)
    readonly.flags.writeable = False
    state = {
        "matrix": matrix,
        "transposed": matrix.T,
        "reversed": matrix[::-1, ::2],
        "big_endian": np.arange(4, dtype=">i4"),
        "readonly": readonly,
        "bool": np.array([True, False]),
        "scalar_array": np.array(2.5, dtype=np.float16),
        "complex": np.array([1 + 2j], dtype=np.complex64),
        "uint64": np.array([2**64 - 1], dtype=np.uint64),
    }
    tree: Any = flatten(state).tree
    assert all(set(node) == {"__ndarray__"} for node in tree.values())
    assert_same(roundtrip(state), state)


# --- unsupported values and cycles ----------------------------------------------------------------


class Foo:
    pass


def test_unsupported_value_message_names_path_and_type() -> None:
    with pytest.raises(UnsupportedValue) as info:
        flatten({"optimizer": {"param_groups": [{"foo": Foo()}]}})
    assert str(info.value) == (
        'state["optimizer"]["param_groups"][0]["foo"]: unsupported type Foo; '
        "store tensors, JSON values or objects with state_dict()"
    )
    assert isinstance(info.value, TypeError) and isinstance(info.value, CloudCkptError)


def test_unsupported_value_path_through_int_keys_and_state_dicts() -> None:
    class Stateful:
        def state_dict(self) -> dict[str, Any]:
            return {"inner": [0, {7: Foo()}]}

    with pytest.raises(UnsupportedValue, match=r'^state\["loader"\]\["inner"\]\[1\]\[7\]: unsupported type Foo;'):
        flatten({"loader": Stateful()})


@pytest.mark.parametrize("value", [
    {1, 2}, 1 + 2j, bytearray(b"x"), Color.RED, Foo, lambda: 0, np.float32, np.array([object()]),
    np.longdouble(1), np.str_("s"), np.ma.array([1, 2]), torch.eye(2).to_sparse(),
    torch.empty(2, dtype=torch.bits8),
])
def test_unsupported_values_are_refused(value: Any) -> None:
    with pytest.raises(UnsupportedValue, match=rf'^state\["x"\]: unsupported type {type(value).__name__};'):
        flatten({"x": value})


def test_state_dict_must_return_a_dict() -> None:
    class Odd:
        def state_dict(self) -> list[int]:
            return [1]

    with pytest.raises(UnsupportedValue, match=r"Odd.state_dict\(\) returned list"):
        flatten({"odd": Odd()})


def test_reference_cycles_are_refused_shared_references_are_not() -> None:
    looped: list[Any] = [1]
    looped.append(looped)
    with pytest.raises(UnsupportedValue, match=r"^state\[1\]: reference cycle"):
        flatten(looped)
    mapping: dict[str, Any] = {}
    mapping["me"] = {"again": mapping}
    with pytest.raises(UnsupportedValue, match=r'^state\["me"\]\["again"\]: reference cycle'):
        flatten(mapping)

    class SelfReferencing:
        def state_dict(self) -> dict[str, Any]:
            return {"self": self}

    with pytest.raises(UnsupportedValue, match=r'^state\["s"\]\["self"\]: reference cycle'):
        flatten({"s": SelfReferencing()})
    shared = [1, 2]
    assert flatten({"a": shared, "b": (shared, shared)}).tree == {"a": [1, 2], "b": {"__tuple__": [[1, 2], [1, 2]]}}


def test_nesting_depth_is_bounded() -> None:
    deep: list[Any] = []
    for _ in range(MAX_DEPTH + 5):
        deep = [deep]
    with pytest.raises(UnsupportedValue, match="nested deeper"):
        flatten(deep)
    tree: Any = 0
    for _ in range(10 * MAX_DEPTH):
        tree = {"__tuple__": [tree]}
    with pytest.raises(CorruptCheckpoint, match="nested deeper"):
        unflatten(tree, [])


# --- pickle opt-in --------------------------------------------------------------------------------


class Point:
    def __init__(self, x: int, y: int) -> None:
        self.x, self.y = x, y

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Point) and (self.x, self.y) == (other.x, other.y)


class TouchOnLoad:
    """Unpickling this creates a file: evidence that pickled code ran."""

    def __init__(self, path: pathlib.Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, ...]:
        return (pathlib.Path.touch, (self.path,))


def test_pickle_opt_in_round_trips() -> None:
    tree: Any = flatten({"p": Point(1, 2), "t": torch.ones(1)}, allow_pickle=True).tree
    assert set(tree["p"]) == {"__pickle__"} and tree["t"] == {"__tensor__": 0}
    assert roundtrip({"p": Point(1, 2)}, allow_pickle=True) == {"p": Point(1, 2)}


def test_pickle_failure_is_reported() -> None:
    with pytest.raises(UnsupportedValue, match=r'^state\["f"\]: cannot pickle function'):
        flatten({"f": lambda: 0}, allow_pickle=True)


def test_pickled_payload_never_runs_without_opt_in(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> None:
    marker = tmp_path / "marker"
    tree = flatten({"evil": TouchOnLoad(marker)}, allow_pickle=True).tree
    tree = json.loads(json.dumps(tree))

    with monkeypatch.context() as patch:
        def refuse(*args: Any, **kwargs: Any) -> Any:
            raise AssertionError("pickle must not be used without allow_pickle=True")

        patch.setattr(pickle, "loads", refuse)
        patch.setattr(pickle, "Unpickler", refuse)
        with pytest.raises(PickleNotAllowed, match=r'^state\["evil"\]: .*allow_pickle=True'):
            unflatten(tree, [])
        with pytest.raises(PickleNotAllowed):
            unflatten({"__pickle__": "not even base64!"}, [])
    assert not marker.exists()

    unflatten(tree, [], allow_pickle=True)  # the payload is live: with the opt-in it runs
    assert marker.exists()


# --- malformed trees ------------------------------------------------------------------------------

MALFORMED = [
    ({"__tensor__": 2}, "state"),
    ({"a": [0, {"__tensor__": -1}]}, 'state["a"][1]'),
    ({"__tensor__": "0"}, "state"),
    ({"__tensor__": True}, "state"),
    ({"__tensor__": 0.0}, "state"),
    ({"__tensor__": 0, "extra": 1}, "state"),
    ({"a": {"__bogus__": 1}}, 'state["a"]'),
    ({"__tuple__": "abc"}, "state"),
    ({"__dict__": [[1]]}, "state"),
    ({"__dict__": {"a": 1}}, "state"),
    ({"__dict__": [[[1, 2], 3]]}, "state"),
    ({"__dict__": [[1, 2], [1, 3]]}, "state"),
    ({"__dict__": [[1, {"__float__": "NaN"}]]}, "state[1]"),
    ({"__float__": 1}, "state"),
    ({"__np__": {"dtype": "object", "value": 1}}, "state"),
    ({"__np__": {"dtype": ["int8"], "value": 1}}, "state"),
    ({"__np__": {"dtype": "int8", "value": 300}}, "state"),
    ({"__np__": {"dtype": "int8", "value": True}}, "state"),
    ({"__np__": {"dtype": "float32", "value": "1"}}, "state"),
    ({"__np__": {"dtype": "complex64", "value": [1.0]}}, "state"),
    ({"__np__": {"dtype": "bool", "value": 1}}, "state"),
    ({"__bytes__": "!!!"}, "state"),
    ({"__bytes__": 5}, "state"),
    ({"__dtype__": "Tensor"}, "state"),
    ({"__dtype__": "os.system"}, "state"),
    ({"__device__": "nonsense:7"}, "state"),
    ({"__device__": 0}, "state"),
    ({"__state_dict__": [1, 2]}, "state"),
    ({"__state_dict__": {}, "extra": 1}, "state"),
    ({"__state_dict__": {}, "__metadata__": 3}, "state"),
    ({"__ndarray__": 1}, "state"),
    ({"x": (1, 2)}, 'state["x"]'),
    ({"x": b"raw"}, 'state["x"]'),
    ({"x": object()}, 'state["x"]'),
    ({1: 2}, "state"),
]


@pytest.mark.parametrize(("tree", "path"), MALFORMED)
def test_malformed_trees_are_corrupt(tree: Any, path: str) -> None:
    table = [torch.zeros(2), torch.zeros(2, dtype=torch.bfloat16)]
    with pytest.raises(CorruptCheckpoint) as info:
        unflatten(tree, table)
    assert str(info.value).startswith(f"checkpoint tree at {path}: ")


# --- tensor records and bytes ---------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore:ComplexHalf support is experimental")
@pytest.mark.parametrize("name", sorted(TENSOR_DTYPES))
def test_records_round_trip_through_json(name: str) -> None:
    tensor = empty_from_record(TensorRecord(name, [2, 3], "cpu", 6 * TENSOR_DTYPES[name].itemsize))
    record = record_of(tensor)
    assert record == TensorRecord(name, [2, 3], "cpu", 6 * tensor.element_size())
    assert TensorRecord.from_json(json.loads(json.dumps(record.to_json()))) == record
    assert empty_from_record(record, device="meta").shape == (2, 3)


@pytest.mark.parametrize("obj", [
    None, [], {"dtype": "float32", "shape": [1], "device": "cpu"},
    {"dtype": "float32", "shape": [1], "device": "cpu", "nbytes": 4, "extra": 0},
    {"dtype": "float128", "shape": [1], "device": "cpu", "nbytes": 16},
    {"dtype": "qint8", "shape": [1], "device": "cpu", "nbytes": 1},
    {"dtype": 5, "shape": [1], "device": "cpu", "nbytes": 4},
    {"dtype": "float32", "shape": [-1], "device": "cpu", "nbytes": 4},
    {"dtype": "float32", "shape": [True], "device": "cpu", "nbytes": 4},
    {"dtype": "float32", "shape": [1.0], "device": "cpu", "nbytes": 4},
    {"dtype": "float32", "shape": 1, "device": "cpu", "nbytes": 4},
    {"dtype": "float32", "shape": [2], "device": "cpu", "nbytes": 4},
    {"dtype": "float32", "shape": [1], "device": "cpu", "nbytes": True},
    {"dtype": "float32", "shape": [1], "device": "gpu!", "nbytes": 4},
    {"dtype": "float32", "shape": [1], "device": None, "nbytes": 4},
])
def test_malformed_records_are_corrupt(obj: Any) -> None:
    with pytest.raises(CorruptCheckpoint):
        TensorRecord.from_json(obj)


def test_tensor_bytes_is_zero_copy_for_contiguous_tensors() -> None:
    tensor = torch.zeros(4, dtype=torch.int32)
    view = tensor_bytes(tensor)
    tensor.fill_(0x01020304)
    assert bytes(view[:4]) == (0x01020304).to_bytes(4, "little")
    copied = tensor_bytes(tensor.reshape(2, 2).t())
    tensor.zero_()
    assert bytes(copied) != bytes(4 * 4)


def test_tensor_bytes_refuses_what_it_cannot_view() -> None:
    with pytest.raises(ValueError, match="CPU"):
        tensor_bytes(torch.empty(2, device="meta"))
    with pytest.raises(TypeError):
        tensor_bytes(torch.eye(2).to_sparse())


def test_tensor_from_bytes_checks_length_and_copies() -> None:
    record = TensorRecord("float32", [2], "cpu", 8)
    with pytest.raises(CorruptCheckpoint, match="got 7 bytes"):
        tensor_from_bytes(record, b"\x00" * 7)
    source = bytearray(np.array([1.5, -2.0], dtype=np.float32).tobytes())
    tensor = tensor_from_bytes(record, source)
    source[:] = bytes(8)
    assert tensor.tolist() == [1.5, -2.0]
    assert tensor_from_bytes(TensorRecord("int64", [0, 5], "cpu", 0), b"").shape == (0, 5)


# --- chunk planning -------------------------------------------------------------------------------


def records_of_sizes(sizes: list[int]) -> list[TensorRecord]:
    return [TensorRecord("uint8", [n], "cpu", n) for n in sizes]


def own_chunks(plan: ChunkPlan, index: int) -> list[tuple[int, int]]:
    """(tensor_offset, length) of each chunk that holds only tensor ``index``."""
    return [(s.tensor_offset, s.length) for s in plan.segments[index]
            if [p.tensor_index for p in plan.chunks[s.chunk_index]] == [index]]


def test_plan_validates_its_parameters() -> None:
    with pytest.raises(ValueError, match="chunk_size"):
        plan_chunks([], chunk_size=0, pack_threshold=0)
    with pytest.raises(ValueError, match="pack_threshold"):
        plan_chunks([], chunk_size=10, pack_threshold=11)


def test_plan_example() -> None:
    plan = plan_chunks(records_of_sizes([25, 3, 0, 3, 5, 10, 3]), chunk_size=10, pack_threshold=4)
    layout = [[(s.tensor_index, s.tensor_offset, s.chunk_offset, s.length) for s in chunk] for chunk in plan.chunks]
    assert layout == [
        [(0, 0, 0, 10)], [(0, 10, 0, 10)], [(0, 20, 0, 5)],
        [(1, 0, 0, 3), (3, 0, 3, 3), (6, 0, 6, 3)],
        [(4, 0, 0, 5)], [(5, 0, 0, 10)],
    ]
    assert plan.segments[2] == []
    assert [(s.chunk_index, s.chunk_offset) for s in plan.segments[6]] == [(3, 6)]
    assert [plan.chunk_nbytes(i) for i in range(len(plan.chunks))] == [10, 10, 5, 9, 5, 10]


def test_resizing_one_large_tensor_moves_no_other_large_tensor_chunk() -> None:
    before = plan_chunks(records_of_sizes([100, 3, 37, 5, 64, 2]), chunk_size=16, pack_threshold=8)
    after = plan_chunks(records_of_sizes([100, 3, 53, 5, 64, 2]), chunk_size=16, pack_threshold=8)
    for index in (0, 4):
        assert own_chunks(after, index) == own_chunks(before, index) != []
    assert own_chunks(after, 2) == [(0, 16), (16, 16), (32, 16), (48, 5)]


def test_plan_reassembles_real_tensor_bytes() -> None:
    tensors = [random_tensor(torch.float32, (n,), seed=n) for n in (0, 1, 40, 3, 17, 2)]
    records = [record_of(t) for t in tensors]
    plan = plan_chunks(records, chunk_size=32, pack_threshold=16)
    chunks = [b"".join(bytes(tensor_bytes(tensors[s.tensor_index])[s.tensor_offset:s.tensor_offset + s.length])
                       for s in chunk) for chunk in plan.chunks]
    for record, segments, tensor in zip(records, plan.segments, tensors, strict=True):
        data = b"".join(chunks[s.chunk_index][s.chunk_offset:s.chunk_offset + s.length] for s in segments)
        assert_same_tensor(tensor_from_bytes(record, data), tensor)


@settings(max_examples=300, deadline=None)
@given(
    sizes=st.lists(st.one_of(st.integers(0, 40), st.integers(0, 400)), max_size=40),
    chunk_size=st.integers(1, 64),
    threshold_fraction=st.floats(0, 1),
)
def test_plan_properties(sizes: list[int], chunk_size: int, threshold_fraction: float) -> None:
    pack_threshold = int(chunk_size * threshold_fraction)
    plan = plan_chunks(records_of_sizes(sizes), chunk_size=chunk_size, pack_threshold=pack_threshold)

    covered = [bytearray(n) for n in sizes]
    for chunk_index, chunk in enumerate(plan.chunks):
        assert chunk and plan.chunk_nbytes(chunk_index) <= chunk_size
        assert [s.chunk_offset for s in chunk] == [sum(p.length for p in chunk[:i]) for i in range(len(chunk))]
        for piece in chunk:
            assert piece.length > 0
            for offset in range(piece.tensor_offset, piece.tensor_offset + piece.length):
                covered[piece.tensor_index][offset] += 1
    assert all(set(c) <= {1} for c in covered)  # every byte exactly once

    for index, (size, segments) in enumerate(zip(sizes, plan.segments, strict=True)):
        offsets = [s.tensor_offset for s in segments]
        assert offsets == [sum(s.length for s in segments[:i]) for i in range(len(segments))]  # in order
        from_chunks = [(c, p.chunk_offset, p.tensor_offset, p.length)
                       for c, chunk in enumerate(plan.chunks) for p in chunk if p.tensor_index == index]
        assert sorted(astuple(s) for s in segments) == sorted(from_chunks)  # both views agree
        if size >= max(pack_threshold, 1):
            assert own_chunks(plan, index) == [(o, min(chunk_size, size - o)) for o in range(0, size, chunk_size)]
        elif size:
            assert len(segments) == 1 and segments[0].length == size

    small = [i for i, n in enumerate(sizes) if 0 < n < pack_threshold]
    packs = sorted({plan.segments[i][0].chunk_index for i in small})
    assert [p.tensor_index for c in packs for p in plan.chunks[c]] == small  # table order
    for previous, following in itertools.pairwise(packs):
        assert plan.chunk_nbytes(previous) + plan.chunks[following][0].length > chunk_size
