"""Restart in the middle: a 10-epoch run stopped after epoch 5 and resumed by brand-new Trainer,
CheckpointCallback and CheckpointManager objects on the same root ends exactly where an
uninterrupted run ends: same checkpoints kept, same pointers, same best history in
.cloudckpt/state.json, same weights.
"""

from __future__ import annotations

import datetime as dt

import pytest
import torch
from cb_util import (
    BEST,
    Hook,
    ScriptedRun,
    SweepClock,
    best_history,
    chunk_keys,
    epoch_name,
    manifest_names,
    pointer_target,
    referenced_chunk_keys,
    state_json,
    step_name,
)

from cloudckpt import CheckpointCallback, CheckpointManager, MemoryStorage, SweepConfig
from cloudckpt.pointers import LATEST_POINTER

#: best so far at epoch 2 (before the stop), a new best at epoch 7 (after it), worse after that
SCRIPT = [1.0, 0.4, 0.6, 0.7, 0.8, 0.9, 0.2, 0.5, 0.45, 0.3]
STOP_AFTER = 5


def _callback(store, **kwargs) -> CheckpointCallback:
    kwargs.setdefault("save_frequency", 1)
    kwargs.setdefault("save_best", True)
    kwargs.setdefault("keep_last_n", 3)
    return CheckpointCallback(store, **kwargs)


def _stop_after(epoch: int) -> Hook:
    def stop(trainer, e, metrics):
        if e == epoch:
            trainer.stop_requested = True
    return Hook(epoch=stop)


def _uninterrupted(script=SCRIPT, **kwargs):
    store = MemoryStorage()
    run = ScriptedRun([_callback(store, **kwargs)], max_epochs=len(script), val_script=script)
    run.fit()
    return store, run


def _stopped_and_resumed(script=SCRIPT, stop_after=STOP_AFTER, check_midway=None, resumed_name=None, **kwargs):
    store = MemoryStorage()
    first = ScriptedRun([_callback(store, **kwargs), _stop_after(stop_after)], max_epochs=len(script),
                        val_script=script)
    first.fit()
    assert first.trainer.global_step == 2 * stop_after
    if check_midway:
        check_midway(store)
    callback = _callback(store, **kwargs)  # new callback, new manager, new trainer, same root
    second = ScriptedRun([callback], max_epochs=len(script), val_script=script, seed=99)
    second.fit()
    assert callback.resumed_from.name == (resumed_name or epoch_name(stop_after))
    assert callback.resumed_from.step == 2 * stop_after
    assert len(second.trainer.losses) == 2 * (len(script) - stop_after)
    return store, second, callback


def test_restart_keeps_retention_pointers_and_history_identical():
    def midway(store):
        assert manifest_names(store) == {epoch_name(2), epoch_name(3), epoch_name(4), epoch_name(5)}
        assert pointer_target(store, BEST) == epoch_name(2)

    expected_store, expected_run = _uninterrupted()
    store, run, callback = _stopped_and_resumed(check_midway=midway)

    kept = {epoch_name(7), epoch_name(8), epoch_name(9), epoch_name(10)}  # last 3 + the best (epoch 7)
    assert manifest_names(store) == manifest_names(expected_store) == kept
    assert pointer_target(store, LATEST_POINTER) == epoch_name(10)
    assert pointer_target(store, BEST) == pointer_target(expected_store, BEST) == epoch_name(7)
    assert callback.best_value == pytest.approx(0.2)
    # the best history (the run's top-K values, kept or not) continued across the restart
    assert best_history(store) == best_history(expected_store)
    assert best_history(store)[0][0] == epoch_name(7)
    assert set(state_json(store)["checkpoints"]) == kept
    # exact resume: the same weights as the uninterrupted run
    for key, value in run.model.state_dict().items():
        assert torch.equal(value, expected_run.model.state_dict()[key]), key


def test_restart_continues_the_top_k_best_history_without_retention():
    """With no retention, ``top_k`` entries of history survive; the resumed run merges into them."""

    def run(stop: bool):
        store = MemoryStorage()

        def callback():
            manager = CheckpointManager(store, monitor="val_loss", top_k=3)
            return CheckpointCallback(store, save_frequency=1, save_best=True, manager=manager)

        if stop:
            ScriptedRun([callback(), _stop_after(STOP_AFTER)], max_epochs=10, val_script=SCRIPT).fit()
            assert [n for n, *_ in best_history(store)] == [epoch_name(e) for e in (2, 3, 4)]
        ScriptedRun([callback()], max_epochs=10, val_script=SCRIPT).fit()
        return store

    resumed, straight = run(stop=True), run(stop=False)
    assert best_history(resumed) == best_history(straight)
    assert [(n, s, e) for n, s, e, _ in best_history(resumed)] == [
        (epoch_name(7), 14, 7), (epoch_name(10), 20, 10), (epoch_name(2), 4, 2)]
    assert [v for *_, v in best_history(resumed)] == pytest.approx([0.2, 0.3, 0.4])
    assert len(manifest_names(resumed)) == 10


def test_restart_remembers_the_best_value_so_worse_epochs_are_not_saved_as_best():
    # save on improvement only: after the restart 0.5 (epoch 6) is worse than 0.4 (epoch 2)
    script = [1.0, 0.4, 0.6, 0.7, 0.8, 0.5, 0.3, 0.35]
    store, _, callback = _stopped_and_resumed(script, save_frequency=None, keep_last_n=None,
                                              stop_after=5, resumed_name=step_name(10))
    # epochs 1, 2 were best; the stop after epoch 5 saved a 'final' step checkpoint (step 10)
    assert manifest_names(store) == {epoch_name(1), epoch_name(2), step_name(10), epoch_name(7),
                                     step_name(16)}
    assert pointer_target(store, BEST) == epoch_name(7)
    assert callback.best_value == pytest.approx(0.3)


def test_restart_with_cleanup_leaves_no_garbage():
    clock = SweepClock()
    cleanup = SweepConfig(cleanup="delete", grace=dt.timedelta(minutes=30), clock=clock)
    store, _, callback = _stopped_and_resumed(cleanup=cleanup)
    clock.advance(dt.timedelta(hours=1))
    callback.manager.prune()
    assert chunk_keys(store) == referenced_chunk_keys(store)
    assert manifest_names(store) == {epoch_name(7), epoch_name(8), epoch_name(9), epoch_name(10)}


def test_restart_twice_and_a_crash_in_between():
    """Stop after 3, crash (no emergency save) in epoch 6, resume to 10: still the same end state."""
    expected_store, expected_run = _uninterrupted()
    store = MemoryStorage()
    ScriptedRun([_callback(store), _stop_after(3)], max_epochs=10, val_script=SCRIPT).fit()
    crashing = ScriptedRun([_callback(store, save_on_exception=False)], max_epochs=10, val_script=SCRIPT,
                           fail_at_step=12)
    with pytest.raises(RuntimeError, match="boom"):
        crashing.fit()
    assert pointer_target(store, LATEST_POINTER) == epoch_name(5)
    final = ScriptedRun([_callback(store)], max_epochs=10, val_script=SCRIPT)
    final.fit()
    assert manifest_names(store) == manifest_names(expected_store)
    assert pointer_target(store, BEST) == epoch_name(7)
    assert best_history(store) == best_history(expected_store)
    for key, value in final.model.state_dict().items():
        assert torch.equal(value, expected_run.model.state_dict()[key]), key
