"""Retries: transient failures are retried without real sleeps, permanent ones are not retried."""

from __future__ import annotations

import pytest

from cloudckpt.errors import AlreadyExists, PermissionDenied, PreconditionFailed, TransientError
from cloudckpt.storage import IfMatch, MemoryStorage, RetryingStorage, RetryPolicy, upload_multipart
from cloudckpt.storage.faults import Fault, FaultyStorage


def _stack(*faults: Fault, attempts: int = 8):
    sleeps: list[float] = []
    faulty = FaultyStorage(MemoryStorage(), faults)
    return RetryingStorage(faulty, RetryPolicy(max_attempts=attempts, sleep=sleeps.append)), faulty, sleeps


def test_transient_failures_are_retried_with_backoff_and_no_real_sleep():
    store, faulty, sleeps = _stack(Fault("put", nth=1, kind="transient", times=3))
    store.put("k", b"v")
    assert faulty.counts["put"] == 4
    assert len(sleeps) == 3 and all(0 <= s <= 10 for s in sleeps)
    assert store.get("k") == b"v"


def test_permanent_failures_are_raised_at_once():
    store, faulty, sleeps = _stack(Fault("get", nth=1, kind="permanent"))
    store.put("k", b"v")
    with pytest.raises(PermissionDenied):
        store.get("k")
    assert faulty.counts["get"] == 1 and sleeps == []


def test_attempts_are_bounded():
    store, faulty, sleeps = _stack(Fault("head", nth=1, kind="transient", times=100), attempts=4)
    store.put("k", b"v")
    with pytest.raises(TransientError):
        store.head("k")
    assert faulty.counts["head"] == 4 and len(sleeps) == 3


def test_policy_rejects_nonsense():
    with pytest.raises(ValueError):
        RetryPolicy(max_attempts=0)


@pytest.mark.parametrize("mode", ["create", "if-match"])
def test_conditional_put_whose_reply_was_lost_counts_as_done(mode):
    store, faulty, _ = _stack(Fault("put", nth=2, kind="lost_response"))
    first = store.put("latest.ckpt", b"old")
    put_mode = "create" if mode == "create" else IfMatch(first.token)
    key = "commit.ckpt" if mode == "create" else "latest.ckpt"
    info = store.put(key, b"new", mode=put_mode)
    assert store.get(key) == b"new" and info.size == 3
    assert faulty.counts["put"] == 3  # the lost one and the retry that found it applied


def test_a_real_conflict_after_a_lost_reply_is_still_a_conflict():
    store, faulty, _ = _stack(Fault("put", nth=2, kind="transient"))
    store.put("commit.ckpt", b"someone else's")
    with pytest.raises(AlreadyExists):
        store.put("commit.ckpt", b"mine", mode="create")
    assert store.get("commit.ckpt") == b"someone else's"
    stale = store.head("commit.ckpt").token
    store.put("commit.ckpt", b"moved on")
    with pytest.raises(PreconditionFailed):
        store.put("commit.ckpt", b"mine", mode=IfMatch(stale))


def test_multipart_parts_are_retried():
    store, faulty, sleeps = _stack(Fault("upload_part", nth=2, kind="transient", times=2))
    data = bytes(range(256)) * 40
    upload_multipart(store, "big", data, part_size=1024, concurrency=1)
    assert store.get("big") == data
    assert len(sleeps) == 2


@pytest.mark.parametrize("kind", ["crash_before", "crash_after"])
def test_simulated_crashes_pass_through_retries_and_except_exception(kind):
    from cloudckpt.errors import SimulatedCrash

    store, faulty, sleeps = _stack(Fault("put", nth=1, kind=kind))
    with pytest.raises(SimulatedCrash):
        try:
            store.put("k", b"v")
        except Exception:  # what careless code would write: it must not catch a crash
            pytest.fail("SimulatedCrash was caught by `except Exception`")
    assert sleeps == []
    assert (faulty.inner.list() != []) == (kind == "crash_after")


def test_faults_count_by_verb_and_key_prefix():
    faulty = FaultyStorage(MemoryStorage(), [Fault("put", nth=2, key_prefix="chunks/", kind="permanent")])
    faulty.put("a", b"1")
    faulty.put("chunks/x", b"2")
    faulty.put("b", b"3")
    with pytest.raises(PermissionDenied):
        faulty.put("chunks/y", b"4")
    assert faulty.counts["put"] == 4 and faulty.bytes_put == 3
    assert [k for _, k in faulty.calls] == ["a", "chunks/x", "b", "chunks/y"]
    with pytest.raises(ValueError):
        Fault("teleport")


def test_transient_rate_is_seeded_and_retries_absorb_it():
    faulty = FaultyStorage(MemoryStorage(), transient_rate=0.3, seed=7)
    store = RetryingStorage(faulty, RetryPolicy(max_attempts=30, sleep=lambda s: None))
    for i in range(50):
        store.put(f"k{i}", bytes([i]))
    assert all(store.get(f"k{i}") == bytes([i]) for i in range(50))
    assert faulty.injected > 10
