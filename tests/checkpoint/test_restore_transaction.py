"""A restore is all or nothing: when it raises, the live model, optimizer, scheduler, sampler,
progress and RNG are bit-identical to what they were before the call (issue 12, item 1)."""

from __future__ import annotations

import copy
import dataclasses
import json
import random

import numpy as np
import pytest
import torch
from ckpt_util import assert_same_tree

from cloudckpt import CheckpointManager, CorruptCheckpoint, PartialRestore, ResumableSampler, TransferConfig
from cloudckpt.format.manifest import canonical_sha256
from cloudckpt.restore import StateMismatch
from cloudckpt.storage import Storage
from cloudckpt.storage.faults import Fault, FaultyStorage

KiB = 1024
#: Small chunks, so that a ~100 KiB state spans many of them and one can be damaged "in the middle".
SMALL = TransferConfig(chunk_size=16 * KiB, pack_threshold=4 * KiB, pack_size=4 * KiB, range_size=8 * KiB)
#: The same, with a staging budget smaller than the state: the restore verifies everything, then reads again.
TWO_PASS = TransferConfig(chunk_size=16 * KiB, pack_threshold=4 * KiB, pack_size=4 * KiB, range_size=8 * KiB,
                          staging_budget=32 * KiB)
#: Two passes over zstd-compressed chunks: what is verified and staged is the decompressed content.
TWO_PASS_ZSTD = dataclasses.replace(TWO_PASS, compression="zstd")
PASSES = pytest.mark.parametrize("transfer", [SMALL, TWO_PASS, TWO_PASS_ZSTD], ids=["one-pass", "two-pass", "zstd"])


class Run:
    """A small training run: model, AdamW, a scheduler, a resumable sampler and a progress dict."""

    def __init__(self, last_width: int = 8) -> None:
        torch.manual_seed(0)
        self.model = torch.nn.Sequential(torch.nn.Linear(32, 96), torch.nn.ReLU(), torch.nn.Linear(96, 96),
                                         torch.nn.ReLU(), torch.nn.Linear(96, last_width))
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=0.01)
        self.scheduler = torch.optim.lr_scheduler.StepLR(self.optimizer, step_size=2, gamma=0.5)
        self.sampler = ResumableSampler(range(50), seed=1)
        self.state = {"model": self.model, "optimizer": self.optimizer, "scheduler": self.scheduler,
                      "sampler": self.sampler, "progress": {"step": 0, "loader": {"epoch": 0}}}

    def train(self, steps: int) -> None:
        for _ in range(steps):
            self.model(torch.randn(4, 32)).square().mean().backward()
            self.optimizer.step()
            self.optimizer.zero_grad()
            self.scheduler.step()
            next(iter(self.sampler))
            self.state["progress"]["step"] += 1
            self.state["progress"]["loader"]["epoch"] = self.sampler.epoch

    def snapshot(self) -> dict:
        """Everything a restore could touch, deep-copied (tensors cloned), plus the process's RNG."""
        return {
            "model": {k: v.clone() for k, v in self.model.state_dict().items()},
            "optimizer": copy.deepcopy(self.optimizer.state_dict()),
            "scheduler": copy.deepcopy(self.scheduler.state_dict()),
            "sampler": dict(self.sampler.state_dict()),
            "progress": copy.deepcopy(self.state["progress"]),
            "rng": _rng_now(),
        }


def _rng_now() -> dict:
    return {"python": random.getstate(), "numpy": [x.tolist() if hasattr(x, "tolist") else x
                                                 for x in np.random.get_state()],
            "torch": torch.get_rng_state().clone()}


def _saved_run(store: Storage, transfer: TransferConfig) -> Run:
    """A root with exactly one checkpoint (so no fallback), and the run trained on past it."""
    run = Run()
    run.train(3)
    CheckpointManager(store, transfer=transfer).save(run.state, step=3)
    run.train(2)
    random.random(), np.random.rand(), torch.rand(1)  # the RNG moved on too
    return run


def _middle_chunk(store: Storage) -> str:
    (name,) = [o.key for o in store.list() if o.key.endswith(".ckpt") and o.key.startswith("checkpoint_")]
    chunks = json.loads(store.get(name))["chunks"]
    assert len(chunks) >= 8, "the test needs a checkpoint of many chunks"
    return chunks[len(chunks) // 2]["key"]


def _assert_untouched(run: Run, before: dict) -> None:
    assert_same_tree(run.snapshot(), before)


@PASSES
def test_a_corrupt_chunk_in_the_middle_leaves_everything_untouched(any_store, transfer):
    run = _saved_run(any_store, transfer)
    key = _middle_chunk(any_store)
    data = bytearray(any_store.get(key))
    data[len(data) // 2] ^= 0xFF
    any_store.put(key, bytes(data))
    before = run.snapshot()
    with pytest.raises(CorruptCheckpoint, match="CRC32C"):
        CheckpointManager(any_store, transfer=transfer).restore(run.state)
    _assert_untouched(run, before)


@PASSES
def test_a_storage_error_in_the_middle_of_the_read_leaves_everything_untouched(any_store, transfer):
    run = _saved_run(any_store, transfer)
    failing = FaultyStorage(any_store, [Fault("get", nth=6, kind="permanent", key_prefix="chunks/")])
    before = run.snapshot()
    with pytest.raises(Exception, match="injected permanent failure"):
        CheckpointManager(failing, transfer=transfer).restore(run.state)
    assert failing.injected == 1
    _assert_untouched(run, before)


def test_a_shape_mismatch_in_the_last_tensor_fails_before_any_read(any_store):
    _saved_run(any_store, SMALL)
    other = Run(last_width=9)  # the last layer (the last tensors saved before the RNG) differs
    other.train(1)
    before = other.snapshot()
    counting = FaultyStorage(any_store)
    with pytest.raises(StateMismatch, match=r"shape \(8"):
        CheckpointManager(counting, transfer=SMALL).restore(other.state)
    assert not [key for verb, key in counting.calls if verb == "get" and key.startswith("chunks/")]
    _assert_untouched(other, before)


def test_a_module_with_other_keys_fails_before_anything_is_written(any_store):
    run = _saved_run(any_store, SMALL)
    bigger = torch.nn.Sequential(*run.model, torch.nn.Linear(8, 2))  # same first layers, one more
    before = {k: v.clone() for k, v in bigger.state_dict().items()}
    rng = _rng_now()
    with pytest.raises(StateMismatch, match="lacks"):
        CheckpointManager(any_store, transfer=SMALL).restore({**run.state, "model": bigger})
    assert_same_tree({k: v.clone() for k, v in bigger.state_dict().items()}, before)
    assert_same_tree(_rng_now(), rng)


def test_a_saved_rng_state_that_does_not_load_leaves_everything_untouched(any_store):
    """The RNG is loaded (and checked) before the live tensors are written, and put back on failure."""
    run = _saved_run(any_store, SMALL)
    name = "checkpoint_step_00000003.ckpt"
    body = json.loads(any_store.get(name))
    body["state"]["_cloudckpt_rng"]["__state_dict__"]["python"] = {"__tuple__": [3, {"__tuple__": [1, 2]}, None]}
    body["manifest_sha256"] = canonical_sha256(body)
    any_store.put(name, json.dumps(body).encode())
    before = run.snapshot()
    with pytest.raises(CorruptCheckpoint, match="RNG state does not load"):
        CheckpointManager(any_store, transfer=SMALL).restore(run.state)
    _assert_untouched(run, before)


@PASSES
def test_a_good_restore_is_bit_exact(any_store, transfer):
    run = Run()
    run.train(3)
    saved = run.snapshot()  # before the save: a store's client may draw from Python's RNG
    CheckpointManager(any_store, transfer=transfer).save(run.state, step=3)
    run.train(2)
    CheckpointManager(any_store, transfer=transfer).restore(run.state)
    assert_same_tree(run.snapshot(), saved)


def test_a_storage_failure_in_the_second_pass_says_the_state_is_mixed():
    """Above the budget the chunks are read twice; the second read failing is the one case that cannot
    be undone, and the error says so (the first pass had verified everything)."""
    from cloudckpt import MemoryStorage

    store = MemoryStorage()
    run = _saved_run(store, TWO_PASS)
    counting = FaultyStorage(store)
    CheckpointManager(counting, transfer=TWO_PASS).restore(run.state)
    chunk_gets = sum(1 for verb, key in counting.calls if verb == "get" and key.startswith("chunks/"))
    failing = FaultyStorage(store, [Fault("get", nth=chunk_gets, kind="permanent", key_prefix="chunks/")])
    with pytest.raises(PartialRestore, match="verified completely"):
        CheckpointManager(failing, transfer=TWO_PASS).restore(run.state)


def test_chunks_of_live_tensors_need_no_head_yet_a_longer_chunk_is_still_caught(moto_s3, request, tmp_path):
    """Over S3's HTTP API: a restore into live objects HEADs only the chunks its reads cannot bound
    (here none), because each ranged GET's Content-Range reports the object's size; a chunk with a
    byte appended is still refused, and nothing live is touched."""
    from ckpt_util import make_store

    def chunk_calls(store: FaultyStorage, verb: str) -> list[str]:
        return [key for v, key in store.calls if v == verb and key.startswith("chunks/")]

    store = make_store("s3", request, tmp_path)
    run = Run()
    run.train(3)
    CheckpointManager(store, transfer=SMALL, capture_rng=False).save(run.state, step=3)  # every tensor is live
    counting = FaultyStorage(store)
    CheckpointManager(counting, transfer=SMALL, capture_rng=False).restore(run.state)
    assert not chunk_calls(counting, "head") and len(chunk_calls(counting, "get")) >= 8

    fresh, counting = Run(), FaultyStorage(store)  # a new optimizer has no state: its tensors are allocated
    CheckpointManager(counting, transfer=SMALL, capture_rng=False).restore(fresh.state)
    assert chunk_calls(counting, "head")

    key = _middle_chunk(store)
    store.put(key, store.get(key) + b"\0")
    run.train(1)
    before = run.snapshot()
    with pytest.raises(CorruptCheckpoint, match="bytes"):
        CheckpointManager(store, transfer=SMALL, capture_rng=False).restore(run.state)
    _assert_untouched(run, before)
    store.close()
