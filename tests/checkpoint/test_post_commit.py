"""A committed checkpoint is never reported as a failed save (issue 12, item 5): settings that cannot
work are refused when the manager is built; failures of pointers, the run index or retention after
the commit are logged and listed on the returned info; a retried save of a committed checkpoint is a
no-op."""

from __future__ import annotations

import datetime as _dt
import logging

import pytest
import torch

from cloudckpt import (
    AlreadyExists,
    CheckpointManager,
    KeepBestAndLatest,
    KeepBestK,
    KeepLastN,
    MemoryStorage,
    SweepConfig,
)
from cloudckpt.storage.faults import Fault, FaultyStorage

C1 = "checkpoint_step_00000001.ckpt"


def _state(seed: int = 0) -> dict:
    torch.manual_seed(seed)
    return {"model": torch.nn.Linear(4, 4), "progress": {"step": seed}}


@pytest.mark.parametrize("retention", [KeepBestK(1), KeepBestAndLatest(), KeepLastN(2) | KeepBestK(1)],
                         ids=["KeepBestK", "KeepBestAndLatest", "KeepLastN|KeepBestK"])
def test_a_best_policy_without_a_metric_is_refused_when_the_manager_is_built(retention):
    store = MemoryStorage()
    with pytest.raises(ValueError, match="needs a metric"):
        CheckpointManager(store, retention=retention)
    assert store.list() == []
    CheckpointManager(store, retention=retention, monitor="val_loss")  # with a monitor it is fine
    CheckpointManager(store, retention=KeepBestK(1, monitor="val_loss"))


@pytest.mark.parametrize("field", ["grace", "stale_upload_age"])
def test_sweep_durations_must_be_timedeltas(field):
    with pytest.raises(TypeError, match=f"SweepConfig.{field} must be a datetime.timedelta"):
        SweepConfig(**{field: 0})
    with pytest.raises(ValueError, match="must not be negative"):
        SweepConfig(**{field: _dt.timedelta(seconds=-1)})
    SweepConfig(**{field: _dt.timedelta(0)})


def test_other_settings_are_checked_when_the_manager_is_built():
    with pytest.raises(TypeError, match="cleanup must be a SweepConfig"):
        CheckpointManager("memory://", cleanup={"grace": 0})
    with pytest.raises(TypeError, match="transfer must be a TransferConfig"):
        CheckpointManager("memory://", transfer={"chunk_size": 1})
    with pytest.raises(ValueError, match="top_k"):
        CheckpointManager("memory://", top_k=0)


@pytest.mark.parametrize("async_save", [False, True], ids=["sync", "async"])
def test_a_pointer_failure_after_the_commit_is_a_problem_not_a_failed_save(async_save, caplog):
    store = FaultyStorage(MemoryStorage(), [Fault("put", key_prefix="latest.ckpt", kind="permanent")])
    mgr = CheckpointManager(store, capture_rng=False, async_save=async_save)
    with caplog.at_level(logging.ERROR):
        result = mgr.save(_state(), step=1)
        info = result if not async_save else result.result()
    assert info.name == C1 and "latest.ckpt" not in info.pointers
    assert len(info.problems) == 1 and "moving latest.ckpt" in info.problems[0]
    assert "injected permanent failure" in info.problems[0]
    assert any("the checkpoint is saved" in r.getMessage() for r in caplog.records)
    assert [i.name for i in CheckpointManager(store.inner).list()] == [C1]
    second = mgr.save(_state(2), step=2)
    second = second if not async_save else second.result()
    assert second.problems == () and "latest.ckpt" in second.pointers  # the next save moves it
    mgr.close()


def test_a_retention_failure_after_the_commit_is_a_problem_and_retried_next_save():
    calls = []

    def flaky(infos):
        calls.append(len(infos))
        if len(calls) == 1:
            raise RuntimeError("policy bug")
        return {i.name for i in infos}

    mgr = CheckpointManager(MemoryStorage(), capture_rng=False, retention=flaky)
    info = mgr.save(_state(), step=1)
    assert [p.split(" after")[0] for p in info.problems] == ["retention"] and "policy bug" in info.problems[0]
    assert mgr.save(_state(2), step=2).problems == ()
    assert calls == [1, 2] and [i.step for i in mgr.list()] == [1, 2]


def test_a_retried_save_of_a_committed_checkpoint_is_a_no_op():
    """The issue's reproduction: the save's cleanup failed, the caller retried the save."""
    store = FaultyStorage(MemoryStorage(), [Fault("put", key_prefix="latest.ckpt", kind="permanent")])
    mgr = CheckpointManager(store, capture_rng=False)
    state = _state()
    first = mgr.save(state, step=1, metrics={"val_loss": 0.5})
    assert first.problems
    again = mgr.save(state, step=1, metrics={"val_loss": 0.5})
    assert again.name == C1 and again.problems == () and "latest.ckpt" in again.pointers
    assert again.stats.chunks_uploaded == 0
    assert [i.name for i in mgr.list()] == [C1]
    with torch.no_grad():
        state["model"].weight.add_(1.0)
    with pytest.raises(AlreadyExists, match="different state"):  # other content: refused as before
        mgr.save(state, step=1, metrics={"val_loss": 0.5})
