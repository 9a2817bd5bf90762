"""Promise 1/5 on every backend: what is saved comes back bit for bit, whatever its dtype or layout.

Each test saves through ``CheckpointManager(store)`` and reads back twice: with
``mgr.load()`` (new tensors) and with ``mgr.restore(state)`` (in place, into the
caller's own tensors, which must keep their memory).
"""

from __future__ import annotations

import torch
from ckpt_util import (
    assert_same_tensor,
    assert_same_tree,
    make_store,
    params_of,
    tensors_of,
)

import cloudckpt.staged_read
from cloudckpt import CheckpointManager, TransferConfig
from cloudckpt.storage.faults import FaultyStorage

KiB, MiB = 1024, 1024 * 1024
# chunks over 48 KiB go up as multipart uploads (16 KiB parts; S3 raises that to its 5 MiB minimum)
SMALL = TransferConfig(chunk_size=64 * KiB, pack_threshold=16 * KiB, multipart_threshold=48 * KiB,
                       part_size=16 * KiB, range_size=32 * KiB, concurrency=4)

FLOAT8 = [getattr(torch, n) for n in ("float8_e4m3fn", "float8_e4m3fnuz", "float8_e5m2", "float8_e5m2fnuz",
                                      "float8_e8m0fnu") if isinstance(getattr(torch, n, None), torch.dtype)]
DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.int8, torch.int16, torch.int32,
          torch.int64, torch.uint8, torch.bool, torch.complex64, torch.complex128, *FLOAT8]


def _values(dtype: torch.dtype, shape: tuple[int, ...], g: torch.Generator) -> torch.Tensor:
    """Random values of ``dtype``, with the extremes and (for floats) nan, ±inf and -0.0 in them."""
    if dtype is torch.bool:
        return torch.rand(shape, generator=g) > 0.5
    if dtype in FLOAT8:
        return (torch.randn(shape, generator=g) * 8).to(dtype)
    if dtype.is_floating_point or dtype.is_complex:
        t = torch.randn(shape, generator=g, dtype=dtype)
        if t.numel() >= 4:
            t.view(-1)[:4] = torch.tensor([float("nan"), float("inf"), float("-inf"), -0.0]).to(dtype)
        return t
    info = torch.iinfo(dtype)
    low, high = max(info.min, -(2**62)), min(info.max, 2**62)
    t = torch.randint(low, high, shape, generator=g, dtype=dtype)
    if t.numel() >= 2:
        t.view(-1)[:2] = torch.tensor([info.min, info.max], dtype=dtype)
    return t


def _state(fill: str) -> dict:
    """Every dtype and odd layout in one state; ``fill="zeros"`` builds the same structure zeroed."""
    g = torch.Generator().manual_seed(1234)

    def make(dtype, shape):
        t = _values(dtype, shape, g)
        return t if fill == "values" else torch.zeros_like(t)

    base = make(torch.float32, (6, 10))
    grid = make(torch.int32, (8, 9))
    shared = make(torch.float64, (5, 4))
    return {
        "dtypes": {str(d).removeprefix("torch."): make(d, (3, 7)) for d in DTYPES},
        "layout": {
            "transposed": base.t(),                        # non-contiguous
            "strided": grid[::2, 1::3],                    # non-contiguous, offset
            "tied_a": shared,                              # the same tensor twice
            "tied_b": shared,
            "overlap": shared[1:],                         # a view of the same memory, other shape
            "empty": make(torch.float32, (0, 3)),          # zero-size
            "empty_int": make(torch.int64, (0,)),
            "scalar": make(torch.float64, ()),             # 0-dim
            "scalar_bool": make(torch.bool, ()),
            "nested": [make(torch.bfloat16, (2, 2)), {"deep": make(torch.uint8, (33,))}],
        },
        "json": {"note": "hi", "f": 0.1, "n": None, "ok": True, "list": [1, 2.5, "x"]},
    }


def test_every_dtype_and_layout_roundtrips(any_store):
    expected = _state("values")
    mgr = CheckpointManager(any_store)
    info = mgr.save(expected, step=1)
    assert info.name == "checkpoint_step_00000001.ckpt"

    loaded, linfo = CheckpointManager(any_store).load()
    assert linfo.name == info.name
    assert_same_tree(loaded, expected)
    # tied tensors come back as one tensor, not two copies
    assert loaded["layout"]["tied_a"] is loaded["layout"]["tied_b"]

    target = _state("zeros")
    before = {path: t.data_ptr() for path, t in tensors_of(target).items()}
    restored = CheckpointManager(any_store).restore(target)
    assert restored is not None and restored.name == info.name
    assert_same_tree(target, expected)
    after = {path: t.data_ptr() for path, t in tensors_of(target).items()}
    assert after == before, "restore replaced tensors instead of filling them in place"


def test_several_chunks_and_packing_roundtrip(any_store):
    """Small chunk/pack sizes: big tensors span several chunks, small ones share a packed chunk."""
    g = torch.Generator().manual_seed(7)
    expected = {
        "big": torch.randn(300, 257, generator=g),            # ~301 KiB: 5 chunks of its own
        "odd": torch.randn(16 * KiB // 4, generator=g),      # exactly the pack threshold: own chunk
        "small": [torch.randn(i + 1, 3, generator=g, dtype=torch.float64) for i in range(40)],
        "strided": torch.randn(200, 300, generator=g)[::3, ::7],
    }
    counted = FaultyStorage(any_store)  # no faults: counts the calls
    mgr = CheckpointManager(counted, transfer=SMALL, capture_rng=False)
    mgr.save(expected, step=3)
    assert counted.counts["multipart"] == 4  # the four full 64 KiB chunks of "big"
    manifest = mgr.manifest("checkpoint_step_00000003.ckpt")
    # big: 5 chunks of its own, odd: 1, the 40 small ones + strided (~30 KiB): 1 packed chunk
    assert len(manifest.chunks) == 7
    assert max(c.size for c in manifest.chunks) <= 64 * KiB
    per_chunk = [sum(1 for t in manifest.tensors for s in t.segments if s.chunk_index == c)
                 for c in range(len(manifest.chunks))]
    assert max(per_chunk) == 41, "the small tensors are not packed into one chunk"
    assert len(manifest.tensors[0].segments) == 5

    loaded, _ = CheckpointManager(any_store, transfer=SMALL).load()
    assert_same_tree(loaded, expected)
    target = {k: (torch.zeros_like(v) if isinstance(v, torch.Tensor) else [torch.zeros_like(x) for x in v])
              for k, v in expected.items()}
    target["strided"] = torch.zeros(200, 300)[::3, ::7]
    CheckpointManager(any_store, transfer=SMALL).restore(target)
    assert_same_tree(target, expected)
    assert CheckpointManager(any_store, transfer=SMALL).verify().chunks_read == len(manifest.chunks)


def test_model_restores_into_the_same_parameter_memory(any_store, monkeypatch):
    """In place: parameters keep their data_ptr and the reader allocates no second copy of them."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 10))
    lm = _TiedLM()
    saved_model, saved_lm = params_of(model), params_of(lm)
    CheckpointManager(any_store, capture_rng=False).save({"model": model, "lm": lm}, step=5)

    torch.manual_seed(99)
    fresh, fresh_lm = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 10)), _TiedLM()
    ptrs = {n: p.data_ptr() for n, p in [*fresh.named_parameters(), *fresh_lm.named_parameters()]}
    allocated: list[int] = []
    real_empty = cloudckpt.staged_read.empty_from_record

    def spy(record, device="cpu"):
        allocated.append(record.nbytes)
        return real_empty(record, device)

    monkeypatch.setattr(cloudckpt.staged_read, "empty_from_record", spy)
    CheckpointManager(any_store, capture_rng=False).restore({"model": fresh, "lm": fresh_lm})
    assert {n: p.data_ptr() for n, p in [*fresh.named_parameters(), *fresh_lm.named_parameters()]} == ptrs
    assert allocated == [], f"the reader allocated {len(allocated)} staging tensors ({sum(allocated)} bytes)"
    assert_same_tree(params_of(fresh), saved_model)
    assert_same_tree(params_of(fresh_lm), saved_lm)
    assert fresh_lm.head.weight is fresh_lm.embed.weight  # the tie survives


class _TiedLM(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(50, 24)
        self.head = torch.nn.Linear(24, 50, bias=False)
        self.head.weight = self.embed.weight


def test_optimizer_state_roundtrips(any_store):
    torch.manual_seed(3)
    model = torch.nn.Linear(20, 5)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.randn(4, 20)).sum().backward()
    opt.step()
    expected = {"model": params_of(model), "opt": opt.state_dict()}
    CheckpointManager(any_store).save({"model": model, "opt": opt}, step=1)

    torch.manual_seed(4)
    model2 = torch.nn.Linear(20, 5)
    opt2 = torch.optim.AdamW(model2.parameters(), lr=0.5)
    CheckpointManager(any_store).restore({"model": model2, "opt": opt2})
    assert_same_tree(params_of(model2), expected["model"])
    got = opt2.state_dict()
    assert got["param_groups"] == expected["opt"]["param_groups"]
    for pid, entry in expected["opt"]["state"].items():
        for name, value in entry.items():
            assert_same_tensor(got["state"][pid][name], value, f"opt.state[{pid}][{name}]")


def test_multipart_upload_and_ranged_reads_on_s3(moto_s3, request, tmp_path):
    """One 12 MiB chunk goes up as a 3-part S3 multipart upload (5 MiB minimum part) and comes
    back as parallel ranged GETs."""
    store = FaultyStorage(make_store("s3", request, tmp_path))
    transfer = TransferConfig(chunk_size=12 * MiB, pack_threshold=16 * KiB, multipart_threshold=6 * MiB,
                              part_size=5 * MiB, range_size=4 * MiB)
    g = torch.Generator().manual_seed(5)
    expected = {"big": torch.randn(3 * MiB, generator=g), "small": torch.arange(10)}
    mgr = CheckpointManager(store, transfer=transfer, capture_rng=False)
    mgr.save(expected, step=1)
    assert store.counts["multipart"] == 1 and store.counts["upload_part"] == 3 and store.counts["complete"] == 1

    gets_before = store.counts["get"]
    target = {"big": torch.zeros(3 * MiB), "small": torch.zeros(10, dtype=torch.int64)}
    ptr = target["big"].data_ptr()
    CheckpointManager(store, transfer=transfer).restore(target)
    assert target["big"].data_ptr() == ptr
    assert_same_tree(target, expected)
    assert store.counts["get"] - gets_before >= 3  # three 4 MiB ranges of the 12 MiB chunk
    store.close()


def test_conjugate_view_is_not_tied_to_its_base():
    c = torch.randn(4, dtype=torch.complex64, generator=torch.Generator().manual_seed(0))
    mgr = CheckpointManager("memory://", capture_rng=False)
    mgr.save({"c": c, "c_conj": c.conj()}, step=1)
    loaded, _ = mgr.load()
    assert_same_tensor(loaded["c"], c)
    assert_same_tensor(loaded["c_conj"], c.conj().resolve_conj())
