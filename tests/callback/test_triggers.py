"""CheckpointCallback driven by cloudckpt.Trainer on a tiny model, in memory: when it saves, what it
names and marks, best tracking, errors during saves and during training, explicit save/load, and
auto-resume.

Every run has 2 batches per epoch, so epoch ``e`` ends at step ``2 * e``.
"""

from __future__ import annotations

import logging
import math

import pytest
import torch
from cb_util import (
    BEST,
    FakeClock,
    Hook,
    ScriptedRun,
    epoch_name,
    manifest_names,
    pointer_target,
    step_name,
)

from cloudckpt import CheckpointCallback, CheckpointManager, KeepLastN, MemoryStorage
from cloudckpt.errors import AlreadyExists, NotFound, PermissionDenied
from cloudckpt.pointers import LATEST_POINTER
from cloudckpt.storage.faults import Fault, FaultyStorage

FOREVER = 10**9


def _saved(store) -> list[tuple[str, int, str]]:
    """(name, step, reason) of every committed checkpoint, by step, read by a fresh manager."""
    return [(i.name, i.step, i.reason) for i in CheckpointManager(store).list()]


def _callback(store, **kwargs) -> CheckpointCallback:
    kwargs.setdefault("save_best", False)
    return CheckpointCallback(store, **kwargs)


def _messages(caplog, level=logging.WARNING) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= level]


# -- schedule triggers ------------------------------------------------------------------------

def test_save_frequency_every_other_epoch():
    store = MemoryStorage()
    ScriptedRun([_callback(store, save_frequency=2)], max_epochs=6).fit()
    assert _saved(store) == [(epoch_name(2), 4, "periodic"), (epoch_name(4), 8, "periodic"),
                             (epoch_name(6), 12, "periodic")]  # the final step was saved: no 'final'
    assert pointer_target(store, LATEST_POINTER) == epoch_name(6)


def test_save_frequency_with_a_final_save_off_schedule():
    store = MemoryStorage()
    ScriptedRun([_callback(store, save_frequency=2)], max_epochs=5).fit()
    assert _saved(store) == [(epoch_name(2), 4, "periodic"), (epoch_name(4), 8, "periodic"),
                             (step_name(10), 10, "final")]
    assert pointer_target(store, LATEST_POINTER) == step_name(10)


def test_no_final_save_when_disabled():
    store = MemoryStorage()
    ScriptedRun([_callback(store, save_frequency=2, save_on_train_end=False)], max_epochs=3).fit()
    assert [s for _, s, _ in _saved(store)] == [4]


def test_save_every_n_steps():
    store = MemoryStorage()
    run = ScriptedRun([_callback(store, save_frequency=None, save_every_n_steps=3)], max_epochs=4)
    run.fit()
    assert _saved(store) == [(step_name(3), 3, "periodic"), (step_name(6), 6, "periodic"),
                             (step_name(8), 8, "final")]
    mgr = CheckpointManager(store)
    assert [i.epoch for i in mgr.list()] == [1, 2, 4]  # epochs *completed* when each was taken (step 6 ends epoch 3 later)


def test_save_every_seconds_with_a_fake_clock():
    store = MemoryStorage()
    clock = FakeClock()
    tick = Hook(step=lambda trainer, step, logs: clock.advance(10.0))  # every step takes "10 s"
    callback = _callback(store, save_frequency=None, save_every_seconds=25, clock=clock)
    ScriptedRun([tick, callback], max_epochs=4).fit()  # tick runs before the callback's hook
    # 30 s after the start (step 3), 30 s after that save (step 6), then the final step 8
    assert _saved(store) == [(step_name(3), 3, "periodic"), (step_name(6), 6, "periodic"),
                             (step_name(8), 8, "final")]


def test_save_every_seconds_counts_from_the_last_save_of_any_kind():
    store = MemoryStorage()
    clock = FakeClock()
    tick = Hook(step=lambda trainer, step, logs: clock.advance(10.0))
    callback = _callback(store, save_frequency=1, save_every_seconds=25, clock=clock)
    ScriptedRun([tick, callback], max_epochs=3).fit()
    # epoch ends at steps 2, 4, 6 reset the timer, so the 25 s trigger never fires
    assert [s for _, s, _ in _saved(store)] == [2, 4, 6]


def test_save_best_saves_on_strict_improvement_only():
    store = MemoryStorage()
    callback = _callback(store, save_frequency=None, save_best=True)
    #                 epoch: 1    2    3    4 (tie) 5    6
    ScriptedRun([callback], max_epochs=6, val_script=[1.0, 0.8, 0.9, 0.8, 0.5, 0.6]).fit()
    assert _saved(store) == [(epoch_name(1), 2, "best"), (epoch_name(2), 4, "best"),
                             (epoch_name(5), 10, "best"), (step_name(12), 12, "final")]
    assert pointer_target(store, BEST) == epoch_name(5)
    assert callback.best_value == pytest.approx(0.5)
    assert CheckpointManager(store, monitor="val_loss").best().metrics["val_loss"] == pytest.approx(0.5)


def test_save_best_mode_max():
    store = MemoryStorage()
    callback = _callback(store, save_frequency=None, save_best=True, mode="max", save_on_train_end=False)
    ScriptedRun([callback], max_epochs=4, val_script=[0.1, 0.3, 0.2, 0.4]).fit()
    assert [n for n, _, _ in _saved(store)] == [epoch_name(1), epoch_name(2), epoch_name(4)]
    assert pointer_target(store, BEST) == epoch_name(4)


def test_periodic_saves_carry_metrics_and_move_the_best_pointer():
    store = MemoryStorage()
    callback = _callback(store, save_frequency=1, save_best=True)
    ScriptedRun([callback], max_epochs=4, val_script=[0.5, 0.3, 0.4, 0.35]).fit()
    assert [r for _, _, r in _saved(store)] == ["periodic"] * 4  # 'periodic' wins over 'best'
    assert pointer_target(store, BEST) == epoch_name(2)
    assert callback.best_value == pytest.approx(0.3)


@pytest.mark.parametrize("frequency, every_n, seconds", [
    (1, 3, None), (1, 2, None), (2, 1, None), (1, None, 15), (1, 3, 25),
])
def test_combined_triggers_never_save_a_step_twice(frequency, every_n, seconds):
    inner = MemoryStorage()
    store = FaultyStorage(inner)
    clock = FakeClock()
    tick = Hook(step=lambda trainer, step, logs: clock.advance(10.0))
    callback = _callback(store, save_frequency=frequency, save_every_n_steps=every_n,
                         save_every_seconds=seconds, clock=clock)
    ScriptedRun([tick, callback], max_epochs=5).fit()
    steps = [s for _, s, _ in _saved(inner)]
    assert len(steps) == len(set(steps)), steps
    manifest_puts = [k for verb, k in store.calls if verb == "put" and k.startswith("checkpoint_")]
    assert len(manifest_puts) == len(set(manifest_puts)) == len(steps)  # not even attempted twice
    assert steps[-1] == 10  # the end of training is always saved
    if every_n is not None:  # every scheduled step is there (under one name or another)
        assert {s for s in range(1, 11) if s % every_n == 0} <= set(steps)
    assert {2 * e for e in range(1, 6) if e % frequency == 0} <= set(steps)


def test_step_trigger_at_epoch_end_does_not_lose_the_best_checkpoint():
    """Regression: a step trigger that saved an epoch's last step (without metrics) must not make the
    epoch-end save (with metrics) look like a duplicate, or save_best never records a best.

    The epoch-end save of such a step is stored as well (an epoch name, with the metrics); its
    chunks are all deduplicated, and no step is ever saved twice *without* new metrics.
    """
    store = FaultyStorage(MemoryStorage())
    callback = _callback(store, save_frequency=None, save_every_n_steps=2, save_best=True)
    ScriptedRun([callback], max_epochs=4, val_script=[1.0, 0.5, 0.7, 0.6]).fit()
    mgr = CheckpointManager(store.inner, monitor="val_loss")
    best = mgr.best()
    assert best is not None and best.name == epoch_name(2) and best.step == 4
    assert best.metrics["val_loss"] == pytest.approx(0.5)
    assert callback.best_value == pytest.approx(0.5)
    saved = _saved(store.inner)
    assert [n for n, _, _ in saved if n.startswith("checkpoint_step_")] == [step_name(s) for s in (2, 4, 6, 8)]
    assert [n for n, _, _ in saved if n.startswith("checkpoint_epoch_")] == [epoch_name(1), epoch_name(2)]
    # the same-step epoch saves uploaded no chunk again
    chunk_puts = [k for verb, k in store.calls if verb == "put" and k.startswith("chunks/")]
    assert len(chunk_puts) == len(set(chunk_puts))


# -- the end of training and exceptions ---------------------------------------------------------

def test_on_exception_saves_an_exception_checkpoint_then_the_error_propagates():
    store = MemoryStorage()
    callback = _callback(store, save_frequency=None)
    run = ScriptedRun([callback], max_epochs=3, fail_at_step=4)
    with pytest.raises(RuntimeError, match="boom"):
        run.fit()
    name = "checkpoint_step_00000003_exception.ckpt"
    assert _saved(store) == [(name, 3, "exception")]
    assert pointer_target(store, LATEST_POINTER) == name
    # and it is a real checkpoint a new run resumes from
    resumed = ScriptedRun([_callback(store, save_frequency=None)], max_epochs=3)
    resumed.fit()
    assert resumed.trainer.global_step == 6 and len(resumed.trainer.losses) == 3


def test_on_exception_does_not_save_a_step_already_saved():
    store = MemoryStorage()
    run = ScriptedRun([_callback(store, save_frequency=1)], max_epochs=3, fail_at_step=5)
    with pytest.raises(RuntimeError, match="boom"):
        run.fit()
    assert _saved(store) == [(epoch_name(1), 2, "periodic"), (epoch_name(2), 4, "periodic")]


def test_on_exception_can_be_disabled():
    store = MemoryStorage()
    run = ScriptedRun([_callback(store, save_frequency=None, save_on_exception=False)], max_epochs=3,
                      fail_at_step=4)
    with pytest.raises(RuntimeError, match="boom"):
        run.fit()
    assert _saved(store) == []


def test_a_failing_emergency_save_does_not_mask_the_training_error(caplog):
    store = FaultyStorage(MemoryStorage(), [Fault("put", kind="permanent", times=FOREVER)])
    run = ScriptedRun([_callback(store, save_frequency=None)], max_epochs=3, fail_at_step=4)
    with caplog.at_level(logging.ERROR, logger="cloudckpt"), pytest.raises(RuntimeError, match="boom"):
        run.fit()
    assert any("emergency checkpoint at step 3 failed" in m for m in _messages(caplog, logging.ERROR))
    assert store.injected >= 1  # the emergency save was attempted


# -- save errors ---------------------------------------------------------------------------------

def test_on_save_error_raise_stops_training():
    store = FaultyStorage(MemoryStorage(), [Fault("put", kind="permanent", key_prefix="chunks/", times=FOREVER)])
    run = ScriptedRun([_callback(store, save_frequency=1)], max_epochs=4)
    with pytest.raises(PermissionDenied):
        run.fit()
    assert run.trainer.global_step == 2  # stopped at the first save (end of epoch 1)
    assert _saved(store.inner) == []


def test_on_save_error_warn_keeps_training(caplog):
    store = FaultyStorage(MemoryStorage(), [Fault("put", kind="permanent", key_prefix="chunks/", times=FOREVER)])
    run = ScriptedRun([_callback(store, save_frequency=1, save_best=True, on_save_error="warn")],
                      max_epochs=4, val_script=[0.4, 0.3, 0.2, 0.1])
    with caplog.at_level(logging.WARNING, logger="cloudckpt"):
        losses = run.fit()
    assert len(losses) == 8 and run.trainer.global_step == 8
    # 4 epoch ends, then the final save (step 8 was never saved) is tried too
    assert sum("training continues" in m for m in _messages(caplog)) == 5
    assert _saved(store.inner) == []


def test_on_save_error_warn_saves_again_once_the_store_recovers(caplog):
    # the second save (epoch 2) fails; the ones before and after it are committed
    store = FaultyStorage(MemoryStorage(), [Fault("put", kind="permanent", key_prefix="checkpoint_", nth=2)])
    callback = _callback(store, save_frequency=1, save_best=True, on_save_error="warn")
    with caplog.at_level(logging.WARNING, logger="cloudckpt"):
        ScriptedRun([callback], max_epochs=4, val_script=[0.4, 0.1, 0.3, 0.35]).fit()
    assert [n for n, _, _ in _saved(store.inner)] == [epoch_name(1), epoch_name(3), epoch_name(4)]
    # the failed epoch-2 save did not count as the best: epoch 3 (0.3 < 0.4) is
    assert pointer_target(store.inner, BEST) == epoch_name(3)


def test_on_save_error_warn_async_one_failure_loses_only_that_save():
    # only the first save's first chunk upload fails; the store is healthy afterwards
    store = FaultyStorage(MemoryStorage(), [Fault("put", kind="permanent", key_prefix="chunks/", nth=1)])
    callback = _callback(store, save_frequency=1, on_save_error="warn", async_save=True)
    ScriptedRun([callback], max_epochs=3).fit()
    callback.manager.wait()
    assert [n for n, _, _ in _saved(store.inner)] == [epoch_name(2), epoch_name(3)]


def test_on_save_error_warn_async_failing_last_save_does_not_raise_from_fit():
    store = FaultyStorage(MemoryStorage(), [Fault("put", kind="permanent", key_prefix="chunks/", times=FOREVER)])
    callback = _callback(store, save_frequency=1, on_save_error="warn", async_save=True)
    run = ScriptedRun([callback], max_epochs=2)
    run.fit()  # must not raise
    assert run.trainer.global_step == 4


# -- explicit save / load ------------------------------------------------------------------------

def _perturb(model: torch.nn.Module) -> None:
    with torch.no_grad():
        for p in model.parameters():
            p.add_(100.0)


def test_explicit_save_and_load_checkpoint_then_restore_state():
    store = MemoryStorage()
    callback = _callback(store, save_frequency=None, save_on_train_end=False)
    run = ScriptedRun([callback], max_epochs=1)
    run.fit()
    trainer = run.trainer
    snapshots = {}
    info = callback.save_checkpoint(trainer, epoch=1, metrics={"val_loss": 0.2})
    assert info.name == epoch_name(1) and info.reason == "manual" and info.step == 2
    snapshots[info.name] = run.params()
    trainer.max_epochs = 3
    callback.auto_resume = False
    trainer.fit()
    info = callback.save_checkpoint(trainer, metrics={"val_loss": 0.5})  # no epoch: a step name
    assert info.name == step_name(6)
    snapshots[info.name] = run.params()
    info = callback.save_checkpoint(trainer, step=99)
    assert info.name == step_name(99) and info.step == 99
    snapshots[info.name] = run.params()

    for which, expected, step in [("best", epoch_name(1), 2), ("latest", step_name(99), 6),
                                  (step_name(6), step_name(6), 6), (epoch_name(1), epoch_name(1), 2),
                                  (99, step_name(99), 6), (2, epoch_name(1), 2)]:
        _perturb(run.model)
        state = callback.load_checkpoint(which)
        assert set(state) >= {"model", "optimizer", "progress"}
        trainer.restore_state(state)
        for key, value in run.model.state_dict().items():
            assert torch.equal(value, snapshots[expected][key]), (which, key)
        assert trainer.global_step == step, which  # the step *counter* saved (99 is only the name's)
    with pytest.raises(NotFound):
        callback.load_checkpoint("checkpoint_epoch_0042.ckpt")


def test_explicit_save_under_a_taken_name_is_refused_and_keeps_the_original():
    store = MemoryStorage()
    callback = _callback(store, save_frequency=1)
    run = ScriptedRun([callback], max_epochs=2, val_script=[1.0, 0.5])
    run.fit()
    before = CheckpointManager(store).list()
    with pytest.raises(AlreadyExists, match="already committed"):
        callback.save_checkpoint(run.trainer, epoch=2, metrics={"val_loss": 0.1})
    assert CheckpointManager(store).list() == before
    assert callback.save_checkpoint(run.trainer).name == step_name(4)  # a step name is still free


def test_load_checkpoint_restores_the_optimizer_state():
    store = MemoryStorage()
    callback = _callback(store, save_frequency=1, save_on_train_end=False)
    run = ScriptedRun([callback], max_epochs=2)
    run.fit()
    saved = run.optimizer.state_dict()
    run.optimizer.state.clear()
    run.trainer.restore_state(callback.load_checkpoint("latest"))
    restored = run.optimizer.state_dict()
    assert restored["param_groups"] == saved["param_groups"]
    for index, entry in saved["state"].items():
        assert torch.equal(restored["state"][index]["momentum_buffer"], entry["momentum_buffer"])


# -- missing / NaN monitored metric --------------------------------------------------------------

def test_missing_monitored_metric_warns_and_never_becomes_best(caplog):
    store = MemoryStorage()
    callback = _callback(store, save_frequency=1, save_best=True)
    with caplog.at_level(logging.WARNING, logger="cloudckpt"):
        ScriptedRun([callback], max_epochs=3, val_script=None).fit()  # no val loader: no metrics
    assert len(_saved(store)) == 3
    assert any("monitored metric 'val_loss' missing" in m for m in _messages(caplog))
    assert pointer_target(store, BEST) is None and callback.best_value is None
    mgr = CheckpointManager(store, monitor="val_loss")
    assert mgr.best() is None
    with pytest.raises(NotFound):
        callback.load_checkpoint("best")


def test_missing_metric_with_save_best_only_saves_nothing_but_the_final(caplog):
    store = MemoryStorage()
    callback = _callback(store, save_frequency=None, save_best=True)
    with caplog.at_level(logging.WARNING, logger="cloudckpt"):
        ScriptedRun([callback], max_epochs=3, val_script=None).fit()
    assert _saved(store) == [(step_name(6), 6, "final")]


def test_nan_monitored_metric_warns_and_never_becomes_best(caplog):
    store = MemoryStorage()
    callback = _callback(store, save_frequency=1, save_best=True)
    nan = math.nan
    with caplog.at_level(logging.WARNING, logger="cloudckpt"):
        ScriptedRun([callback], max_epochs=4, val_script=[nan, 0.5, nan, 0.7]).fit()
    assert any("'val_loss' is NaN" in m for m in _messages(caplog))
    assert pointer_target(store, BEST) == epoch_name(2)
    assert callback.best_value == pytest.approx(0.5)
    infos = {i.name: i for i in CheckpointManager(store).list()}
    assert math.isnan(infos[epoch_name(1)].metrics["val_loss"])  # stored as NaN, not dropped
    state = callback.load_checkpoint("best")
    assert state["progress"]["global_step"] == 4


def test_all_nan_metrics_save_best_only(caplog):
    store = MemoryStorage()
    callback = _callback(store, save_frequency=None, save_best=True, keep_last_n=2)
    nan = math.nan
    with caplog.at_level(logging.WARNING, logger="cloudckpt"):
        ScriptedRun([callback], max_epochs=3, val_script=[nan, nan, nan]).fit()
    assert _saved(store) == [(step_name(6), 6, "final")]
    assert pointer_target(store, BEST) is None


# -- auto resume ---------------------------------------------------------------------------------

def test_auto_resume_restores_the_newest_checkpoint():
    store = MemoryStorage()
    first = ScriptedRun([_callback(store, save_frequency=1)], max_epochs=3)
    first.fit()
    params = first.params()
    callback = _callback(store, save_frequency=1)
    second = ScriptedRun([callback], max_epochs=5, seed=7)  # different initial weights
    seen = {}
    callback_probe = Hook(step=lambda trainer, step, logs: seen.setdefault("first_step", step))
    second.trainer.callbacks.append(callback_probe)
    second.trainer.callbacks[0].on_train_begin(second.trainer)  # resume by hand to compare weights
    assert callback.resumed_from.name == epoch_name(3) and second.trainer.global_step == 6
    for key, value in second.model.state_dict().items():
        assert torch.equal(value, params[key])
    second.fit()  # on_train_begin again: same newest checkpoint
    assert seen["first_step"] == 7 and len(second.trainer.losses) == 4
    assert [n for n, _, _ in _saved(store)] == [epoch_name(e) for e in range(1, 6)]


def test_auto_resume_on_a_fresh_root_starts_from_scratch(caplog):
    store = MemoryStorage()
    callback = _callback(store, save_frequency=1)
    run = ScriptedRun([callback], max_epochs=2)
    with caplog.at_level(logging.INFO, logger="cloudckpt"):
        run.fit()
    assert callback.resumed_from is None
    assert any("starting from scratch" in m for m in _messages(caplog, logging.INFO))
    assert run.trainer.global_step == 4


def test_auto_resume_off_ignores_stored_checkpoints():
    store = MemoryStorage()
    ScriptedRun([_callback(store, save_frequency=1)], max_epochs=2).fit()
    callback = _callback(store, save_frequency=None, save_on_train_end=False, auto_resume=False)
    run = ScriptedRun([callback], max_epochs=1)
    run.fit()
    assert callback.resumed_from is None and run.trainer.global_step == 2


def test_auto_resume_of_a_trainer_without_checkpoint_state():
    """A minimal trainer (state_dict / restore_state only) is resumed through manager.load."""

    class Minimal:
        def __init__(self) -> None:
            self.global_step, self.epoch, self.w = 0, 0, torch.zeros(3)

        def state_dict(self):
            return {"w": self.w.clone(), "progress": {"global_step": self.global_step, "epoch": self.epoch}}

        def restore_state(self, state):
            self.w = state["w"].clone()
            self.global_step = state["progress"]["global_step"]
            self.epoch = state["progress"]["epoch"]

    store = MemoryStorage()
    callback = _callback(store, save_frequency=1)
    trainer = Minimal()
    callback.on_train_begin(trainer)
    for epoch in (1, 2):
        trainer.global_step, trainer.epoch = 10 * epoch, epoch
        trainer.w += 1
        callback.on_epoch_end(trainer, epoch, {})
    callback.on_train_end(trainer)
    fresh = Minimal()
    resumed_cb = _callback(store, save_frequency=1)
    resumed_cb.on_train_begin(fresh)
    assert resumed_cb.resumed_from.name == epoch_name(2)
    assert fresh.global_step == 20 and torch.equal(fresh.w, torch.full((3,), 2.0))


# -- argument validation ---------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, match", [
    ({"save_frequency": 0}, "save_frequency must be a positive integer"),
    ({"save_every_n_steps": -1}, "save_every_n_steps must be a positive integer"),
    ({"keep_last_n": 0}, "keep_last_n must be a positive integer"),
    ({"save_every_seconds": 0}, "save_every_seconds must be positive"),
    ({"on_save_error": "ignore"}, "on_save_error must be 'raise' or 'warn'"),
    ({"keep_last_n": 2, "retention": KeepLastN(2)}, "keep_last_n or retention, not both"),
])
def test_callback_argument_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        CheckpointCallback(MemoryStorage(), **kwargs)


def test_keep_last_n_without_save_best_keeps_only_the_window():
    store = MemoryStorage()
    callback = CheckpointCallback(store, save_frequency=1, save_best=False, keep_last_n=2)
    ScriptedRun([callback], max_epochs=5, val_script=[0.1, 0.9, 0.9, 0.9, 0.9]).fit()
    # without save_best nothing keeps the best by policy; the best pointer still protects it
    assert manifest_names(store) == {epoch_name(1), epoch_name(4), epoch_name(5)}
