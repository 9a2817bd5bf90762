"""Promises 1 and 3: a save that dies at ANY storage call leaves a consistent root.

Checkpoint A is committed; then save B is killed (SimulatedCrash) before or
after each one of its storage calls in turn.  Whatever the moment, a new
manager on the same bytes must find A intact, B either absent or complete,
every manifest's chunks present and verified, and no pointer naming a
checkpoint that does not exist.
"""

from __future__ import annotations

import json

import pytest
import torch
from ckpt_util import assert_same_tree

from cloudckpt import CheckpointManager, MemoryStorage, TransferConfig
from cloudckpt.errors import NotFound, SimulatedCrash
from cloudckpt.pointers import LATEST_POINTER, STATE_KEY, best_pointer_key, read_pointer
from cloudckpt.storage.faults import Fault, FaultyStorage
from cloudckpt.storage.retry import RetryingStorage, RetryPolicy

KiB = 1024
A, B = "checkpoint_step_00000001.ckpt", "checkpoint_step_00000002.ckpt"
BEST = best_pointer_key("loss")


def _state(seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    shared = torch.Generator().manual_seed(0)
    return {
        "model": {"w1": torch.randn(100, 300, generator=g),       # 2 chunks, new in B
                  "w2": torch.randn(64, 128, generator=shared),   # 1 chunk, the same in A and B
                  "b": torch.randn(10, generator=g)},             # packed
        "progress": {"step": seed, "tag": f"run-{seed}"},
    }


STATE_A, STATE_B = _state(1), _state(2)


def _transfer(concurrency: int) -> TransferConfig:
    return TransferConfig(chunk_size=64 * KiB, pack_threshold=16 * KiB, concurrency=concurrency)


def _with_a(concurrency: int) -> tuple[MemoryStorage, FaultyStorage, CheckpointManager]:
    inner = MemoryStorage()
    faulty = FaultyStorage(inner)
    mgr = CheckpointManager(faulty, transfer=_transfer(concurrency), monitor="loss", capture_rng=False)
    mgr.save(STATE_A, step=1, metrics={"loss": 1.0})
    return inner, faulty, mgr


def _save_b(mgr: CheckpointManager):
    return mgr.save(STATE_B, step=2, metrics={"loss": 0.5})


def _calls_of_save_b(concurrency: int) -> list[tuple[str, str]]:
    _, faulty, mgr = _with_a(concurrency)
    first = len(faulty.calls)
    _save_b(mgr)
    return faulty.calls[first:]


def _blank() -> dict:
    return {"model": {"w1": torch.zeros(100, 300), "w2": torch.zeros(64, 128), "b": torch.zeros(10)},
            "progress": {"step": -1, "tag": ""}}


def _check_consistent(inner: MemoryStorage, where: str) -> str:
    """All the invariants a reader relies on; returns the name restore('latest') gave."""
    mgr = CheckpointManager(inner, transfer=_transfer(4), monitor="loss", capture_rng=False)
    names = {i.name for i in mgr.list()}
    assert A in names, f"{where}: checkpoint A disappeared"
    assert names <= {A, B}, f"{where}: unexpected checkpoints {names}"
    b_committed = B in names

    for name in names:  # every committed manifest is complete: chunks present, checksums good
        manifest = mgr.manifest(name)
        for chunk in manifest.chunks:
            assert inner.head(chunk.key).size == chunk.size, f"{where}: {name} misses {chunk.key}"
        mgr.verify(name)
    for key in (LATEST_POINTER, BEST):
        pointer = read_pointer(inner, key)
        if pointer is not None:
            assert pointer.target in names, f"{where}: {key} names missing {pointer.target}"
    try:
        json.loads(inner.get(STATE_KEY))
    except NotFound:
        pass

    target = _blank()
    info = mgr.restore(target)
    assert info is not None and info.name in names, f"{where}: restore gave {info}"
    assert_same_tree(target, STATE_A if info.name == A else STATE_B, f"{where}: restored {info.name}")
    assert info.name == A or b_committed
    mgr.verify()  # latest verifies

    target = _blank()
    mgr.restore(target, which=A)  # A is untouched by whatever B did
    assert_same_tree(target, STATE_A, f"{where}: A")
    return info.name


@pytest.mark.parametrize("concurrency", [1, 4])
def test_crash_at_every_storage_call_of_a_save(concurrency, capsys):
    calls = _calls_of_save_b(concurrency)
    assert len(calls) >= 10, calls
    assert ("put", B) in calls and ("put", LATEST_POINTER) in calls
    outcomes: dict[str, int] = {}
    tried = 0
    for kind in ("crash_before", "crash_after"):
        for i in range(len(calls)):
            inner, faulty, mgr = _with_a(concurrency)
            faulty.faults = [Fault(None, nth=i + 1, kind=kind)]  # counts from the start of save B
            with pytest.raises(SimulatedCrash):
                _save_b(mgr)
            assert faulty.injected == 1
            restored = _check_consistent(inner, f"{kind} at call {i + 1}/{len(calls)} {calls[i]}")
            outcomes[restored] = outcomes.get(restored, 0) + 1
            tried += 1
    assert tried == 2 * len(calls)
    assert outcomes.get(A, 0) > 0 and outcomes.get(B, 0) > 0  # both outcomes happen
    with capsys.disabled():
        print(f"\n[crash] concurrency={concurrency}: save B makes {len(calls)} storage calls; "
              f"{tried} crash points tried; restore('latest') gave {outcomes}")


def test_b_is_latest_after_a_crash_past_its_pointer_update():
    """Crash after latest.ckpt moved (at the best pointer / index update): B is what restore gives."""
    calls = _calls_of_save_b(1)
    after_pointer = calls.index(("put", LATEST_POINTER))
    for i in range(after_pointer, len(calls)):
        inner, faulty, mgr = _with_a(1)
        faulty.faults = [Fault(None, nth=i + 1, kind="crash_after")]
        with pytest.raises(SimulatedCrash):
            _save_b(mgr)
        assert _check_consistent(inner, f"crash after call {i + 1} {calls[i]}") == B


def test_a_restarted_job_can_continue_after_any_crash():
    calls = _calls_of_save_b(1)
    failures = []
    for kind in ("crash_before", "crash_after"):
        for i in range(len(calls)):
            inner, faulty, mgr = _with_a(1)
            faulty.faults = [Fault(None, nth=i + 1, kind=kind)]
            with pytest.raises(SimulatedCrash):
                _save_b(mgr)
            restarted = CheckpointManager(inner, transfer=_transfer(1), monitor="loss", capture_rng=False)
            target = _blank()
            info = restarted.restore(target)
            try:
                if info.step < 2:  # the job redoes step 2 and saves it, as after any restart
                    restarted.save(STATE_B, step=2, metrics={"loss": 0.5})
                restarted.save(_state(3), step=3, metrics={"loss": 0.4})
            except Exception as exc:  # noqa: BLE001 - collect every failing crash point
                failures.append(f"{kind} at {calls[i]}: {type(exc).__name__}: {exc}")
    assert not failures, "\n".join(failures)


def test_transient_faults_on_30_percent_of_calls_are_retried(capsys):
    inner = MemoryStorage()
    faulty = FaultyStorage(inner, transient_rate=0.3, seed=11)
    store = RetryingStorage(faulty, RetryPolicy(sleep=lambda seconds: None))
    mgr = CheckpointManager(store, transfer=_transfer(4), monitor="loss", capture_rng=False)
    mgr.save(STATE_A, step=1, metrics={"loss": 1.0})
    mgr.save(STATE_B, step=2, metrics={"loss": 0.5})

    reader = CheckpointManager(store, transfer=_transfer(4), monitor="loss", capture_rng=False)
    target = _blank()
    assert reader.restore(target).name == B
    assert_same_tree(target, STATE_B)
    target = _blank()
    assert reader.restore(target, which="checkpoint_step_00000001.ckpt").name == A
    assert_same_tree(target, STATE_A)
    reader.verify()
    assert reader.best().name == B
    assert faulty.injected >= 0.2 * len(faulty.calls) and faulty.injected > 5
    with capsys.disabled():
        print(f"\n[retry] {faulty.injected} transient faults injected in {len(faulty.calls)} storage calls; "
              "save + restore succeeded")
