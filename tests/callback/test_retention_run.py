"""Retention and chunk garbage collection over whole training runs.

After a run with ``keep_last_n=3, save_best=True`` exactly the last three
checkpoints and the best one remain, the pointers name the right ones, and
once the grace period is over the chunk pool holds exactly the chunks the
remaining manifests reference: deleted (``cleanup="delete"``) or marked for
the bucket's lifecycle rule (``cleanup="lifecycle"``: memory flag, S3 object
tag, GCS customTime).  Young unreferenced chunks (a concurrent writer's,
uncommitted) survive; pinned and pointed-to checkpoints survive any policy.
"""

from __future__ import annotations

import datetime as dt
from collections import Counter

import pytest
import torch
from cb_util import (
    BEST,
    Hook,
    ScriptedRun,
    SweepClock,
    chunk_keys,
    epoch_name,
    make_store,
    manifest_names,
    pointer_target,
    referenced_chunk_keys,
    state_json,
)

from cloudckpt import CheckpointCallback, CheckpointManager, MemoryStorage, SweepConfig
from cloudckpt.pointers import LATEST_POINTER
from cloudckpt.retention import as_policy
from cloudckpt.storage.lifecycle import EXPIRED_TAG_KEY, EXPIRED_TAG_VALUE

GRACE = dt.timedelta(hours=1)
#: 20 epochs; the best (0.1) is at epoch 4, and epochs 18-20 are worse than it
SCRIPT_20 = [1.0, 0.9, 0.5, 0.1, 0.6] + [0.7 + 0.01 * e for e in range(15)]
EXPECTED_20 = {epoch_name(4), epoch_name(18), epoch_name(19), epoch_name(20)}
#: the shorter per-backend run: best at epoch 2, window epochs 6-8
SCRIPT_8 = [1.0, 0.2, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95]
EXPECTED_8 = {epoch_name(2), epoch_name(6), epoch_name(7), epoch_name(8)}


def _orphan_key(fill: str = "e") -> str:
    digest = fill * 64
    return f"chunks/{digest[:2]}/{digest}"


def _run(store, script, *, cleanup: str, grace=GRACE, clock=None, extra=(), **kwargs):
    clock = clock or SweepClock()
    callback = CheckpointCallback(
        store, save_frequency=1, save_best=True, keep_last_n=3,
        cleanup=SweepConfig(cleanup=cleanup, grace=grace, clock=clock), **kwargs,
    )
    ScriptedRun([callback, *extra], max_epochs=len(script), val_script=script).fit()
    return callback, clock


def _check_kept(store, expected, *, best, latest):
    assert manifest_names(store) == expected
    assert pointer_target(store, LATEST_POINTER) == latest
    assert pointer_target(store, BEST) == best
    mgr = CheckpointManager(store, monitor="val_loss")
    assert mgr.latest().name == latest and mgr.best().name == best
    assert {i.name for i in mgr.list()} == expected
    # the run's index forgot the removed checkpoints; the best history keeps the run's best values
    index = state_json(store)
    assert set(index["checkpoints"]) == expected
    history = index["best_history"]["val_loss"]
    assert history[0]["name"] == best and [h["value"] for h in history] == sorted(h["value"] for h in history)


# -- memory store, both cleanup modes --------------------------------------------------------------

def test_keep_last_3_and_best_after_20_epochs_cleanup_delete():
    store = MemoryStorage()
    callback, clock = _run(store, SCRIPT_20, cleanup="delete")
    _check_kept(store, EXPECTED_20, best=epoch_name(4), latest=epoch_name(20))
    referenced = referenced_chunk_keys(store)
    assert referenced <= chunk_keys(store)
    assert chunk_keys(store) - referenced, "within the grace period the old chunks are still there"

    clock.advance(GRACE + dt.timedelta(minutes=1))
    report = callback.manager.prune()
    assert report.checkpoints_removed == [] and report.chunks_removed > 0
    assert chunk_keys(store) == referenced_chunk_keys(store) == referenced
    for name in EXPECTED_20:  # everything that remains still verifies
        callback.manager.verify(name)


def test_keep_last_3_and_best_after_20_epochs_cleanup_lifecycle():
    store = MemoryStorage()
    callback, clock = _run(store, SCRIPT_20, cleanup="lifecycle")
    _check_kept(store, EXPECTED_20, best=epoch_name(4), latest=epoch_name(20))
    referenced = referenced_chunk_keys(store)
    assert not any(store.is_marked_expired(k) for k in chunk_keys(store)), "nothing old enough yet"

    clock.advance(GRACE + dt.timedelta(minutes=1))
    callback.manager.prune()
    garbage = chunk_keys(store) - referenced
    assert garbage, "lifecycle mode leaves the objects to the bucket"
    assert all(store.is_marked_expired(k) for k in garbage)
    assert not any(store.is_marked_expired(k) for k in referenced)
    assert store.run_lifecycle() == len(garbage)
    assert chunk_keys(store) == referenced
    for name in EXPECTED_20:
        callback.manager.verify(name)


@pytest.mark.parametrize("cleanup", ["delete", "lifecycle"])
def test_grace_zero_cleans_up_at_every_save(cleanup):
    store = MemoryStorage()
    _run(store, SCRIPT_8, cleanup=cleanup, grace=dt.timedelta(0))
    _check_kept(store, EXPECTED_8, best=epoch_name(2), latest=epoch_name(8))
    if cleanup == "lifecycle":
        store.run_lifecycle()
    assert chunk_keys(store) == referenced_chunk_keys(store)


def test_lifecycle_marks_each_garbage_chunk_once():
    marked: Counter[str] = Counter()

    class Recording(MemoryStorage):
        def mark_expired(self, keys):
            keys = list(keys)
            marked.update(keys)
            super().mark_expired(keys)

    store = Recording()
    _run(store, SCRIPT_8, cleanup="lifecycle", grace=dt.timedelta(0))
    assert marked, "garbage was marked"
    assert max(marked.values()) == 1, f"{sum(marked.values())} marks for {len(marked)} chunks"


def test_concurrent_writers_uncommitted_chunks_survive_within_the_grace_period():
    # the store's own clock dates every object; training happens "3 hours ago"
    now = [dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)]
    store = MemoryStorage(clock=lambda: now[0])
    sweep_now = lambda: now[0] + dt.timedelta(minutes=1)
    callback, _ = _run(store, SCRIPT_8, cleanup="delete", clock=sweep_now)
    now[0] += dt.timedelta(hours=3)
    orphan = _orphan_key()
    store.put(orphan, b"uploaded by another writer that has not committed yet")
    report = callback.manager.prune()
    assert orphan in chunk_keys(store)
    assert report.chunks_too_young == 1
    assert chunk_keys(store) == referenced_chunk_keys(store) | {orphan}  # the old garbage is gone
    now[0] += GRACE
    callback.manager.prune()
    assert chunk_keys(store) == referenced_chunk_keys(store)


def test_another_writers_old_checkpoint_is_pruned_with_its_chunks():
    """A checkpoint another manager committed (step 1, outside the window) goes, and so do its chunks."""
    store = MemoryStorage()
    callback, clock = _run(store, SCRIPT_8, cleanup="delete")
    other = CheckpointManager(store, capture_rng=False)
    other.save({"w": torch.arange(1000.0)}, step=1, name="checkpoint_other_writer.ckpt")
    clock.advance(GRACE * 2)
    callback.manager.prune()  # KeepLastN(3) | KeepBestK(1) drops it (step 1)
    assert "checkpoint_other_writer.ckpt" not in manifest_names(store)
    # its chunks became garbage only now: they go once they have been unreferenced for the grace period
    assert chunk_keys(store) > referenced_chunk_keys(store)
    clock.advance(GRACE * 2)
    callback.manager.prune()
    assert chunk_keys(store) == referenced_chunk_keys(store)


def test_pinned_checkpoints_survive_retention():
    store = MemoryStorage()
    clock = SweepClock()
    callback = CheckpointCallback(store, save_frequency=1, save_best=True, keep_last_n=3,
                                  cleanup=SweepConfig(grace=GRACE, clock=clock))

    def pin_epoch_2(trainer, epoch, metrics):  # runs after the callback saved epoch 2
        if epoch == 2:
            callback.manager.pin(epoch_name(2))

    pin = Hook(epoch=pin_epoch_2)
    ScriptedRun([callback, pin], max_epochs=10, val_script=SCRIPT_20[:10]).fit()
    assert callback.manager.pinned() == {epoch_name(2)}
    assert manifest_names(store) == {epoch_name(2), epoch_name(4), epoch_name(8), epoch_name(9), epoch_name(10)}
    clock.advance(GRACE * 2)
    callback.manager.prune()
    assert chunk_keys(store) == referenced_chunk_keys(store)
    callback.manager.verify(epoch_name(2))
    # unpinned, it goes at the next prune
    callback.manager.pin(epoch_name(2), pinned=False)
    callback.manager.prune()
    assert manifest_names(store) == {epoch_name(4), epoch_name(8), epoch_name(9), epoch_name(10)}


def test_retention_never_removes_pointer_targets_even_if_the_policy_keeps_nothing():
    store = MemoryStorage()
    clock = SweepClock()
    callback = CheckpointCallback(store, save_frequency=1, save_best=True, retention=lambda infos: set(),
                                  cleanup=SweepConfig(grace=dt.timedelta(0), clock=clock))
    ScriptedRun([callback], max_epochs=6, val_script=[0.9, 0.3, 0.5, 0.6, 0.7, 0.8]).fit()
    assert manifest_names(store) == {epoch_name(2), epoch_name(6)}
    assert pointer_target(store, LATEST_POINTER) == epoch_name(6)
    assert pointer_target(store, BEST) == epoch_name(2)
    assert chunk_keys(store) == referenced_chunk_keys(store)
    for which in ("latest", "best"):
        callback.manager.verify(which)
    # with latest == best only one checkpoint is protected
    store2 = MemoryStorage()
    callback2 = CheckpointCallback(store2, save_frequency=1, save_best=True, retention=lambda infos: set())
    ScriptedRun([callback2], max_epochs=4, val_script=[0.9, 0.8, 0.7, 0.6]).fit()
    assert manifest_names(store2) == {epoch_name(4)}


def test_prune_dry_run_reports_without_removing():
    store = MemoryStorage()
    clock = SweepClock()
    callback = CheckpointCallback(store, save_frequency=1, save_best=False,
                                  cleanup=SweepConfig(grace=GRACE, clock=clock))
    ScriptedRun([callback], max_epochs=5).fit()
    callback.manager.retention = as_policy(lambda infos: set())  # keep nothing but the protected
    before_manifests, before_chunks = manifest_names(store), chunk_keys(store)
    clock.advance(GRACE * 2)
    report = callback.manager.prune(dry_run=True)
    assert set(report.checkpoints_removed) == before_manifests - {epoch_name(5)}
    # their chunks would become garbage now, and go only a grace period later
    assert report.chunks_removed == 0 and report.chunks_too_young > 0 and report.dry_run
    assert manifest_names(store) == before_manifests and chunk_keys(store) == before_chunks


# -- one full run per backend ---------------------------------------------------------------------

def _s3_tagged(store, key: str) -> bool:
    response = store._client.get_object_tagging(Bucket=store.bucket, Key=store._full(key))
    tags = {t["Key"]: t["Value"] for t in response["TagSet"]}
    return tags.get(EXPIRED_TAG_KEY) == EXPIRED_TAG_VALUE


def _gcs_custom_time(store, key: str):
    return store._bucket.get_blob(store._name(key)).custom_time


@pytest.mark.parametrize("kind, cleanup", [
    ("local", "delete"), ("local", "lifecycle"),
    ("s3", "delete"), ("s3", "lifecycle"),
    ("gcs", "delete"), ("gcs", "lifecycle"),
])
def test_full_run_per_backend(kind, cleanup, request, tmp_path):
    store = make_store(kind, request, tmp_path)
    try:
        callback, clock = _run(store, SCRIPT_8, cleanup=cleanup)
        _check_kept(store, EXPECTED_8, best=epoch_name(2), latest=epoch_name(8))
        referenced = referenced_chunk_keys(store)
        assert chunk_keys(store) - referenced, "within the grace period the old chunks are still there"

        # a concurrent writer's fresh, uncommitted chunk survives a sweep within the grace period
        orphan = _orphan_key()
        store.put(orphan, b"not committed yet")
        callback.manager.prune()
        assert orphan in chunk_keys(store)
        if cleanup == "lifecycle" and kind == "s3":
            assert not _s3_tagged(store, orphan)
        if cleanup == "lifecycle" and kind == "gcs":
            assert _gcs_custom_time(store, orphan) is None

        clock.advance(GRACE + dt.timedelta(minutes=5))
        callback.manager.prune()
        remaining = chunk_keys(store)
        garbage = remaining - referenced
        assert referenced <= remaining
        if cleanup == "delete" or kind == "local":  # a directory has no lifecycle engine: marking deletes
            assert garbage == set()
        elif kind == "s3":
            assert orphan in garbage and len(garbage) > 1
            assert all(_s3_tagged(store, k) for k in garbage)
            assert not any(_s3_tagged(store, k) for k in referenced)
        else:
            assert orphan in garbage and len(garbage) > 1
            assert all(_gcs_custom_time(store, k) is not None for k in garbage)
            assert all(_gcs_custom_time(store, k) is None for k in referenced)
        fresh = CheckpointManager(store, monitor="val_loss")
        for name in EXPECTED_8:
            fresh.verify(name)
        target = ScriptedRun([], max_epochs=1).trainer.checkpoint_state()
        assert fresh.restore(target, which="best").name == epoch_name(2)
        assert target["progress"].global_step == 4
    finally:
        store.close()
