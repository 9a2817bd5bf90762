"""A crash between a checkpoint's commit and the move of the best pointer.

The process "dies" (SimulatedCrash, no emergency save) either right after the
manifest put of epoch 3 (nothing after the commit ran) or right before the
best pointer put (latest already moved).  Either way the old best pointer is
intact, ``restore(which="best")`` gives the old best checkpoint bit for bit,
retention never removes it while the pointer names it, and the next save
after the restart moves the pointer to the best committed checkpoint.
"""

from __future__ import annotations

import pytest
import torch
from cb_util import BEST, Hook, ScriptedRun, epoch_name, manifest_names, pointer_target

from cloudckpt import CheckpointCallback, CheckpointManager, MemoryStorage
from cloudckpt.errors import SimulatedCrash
from cloudckpt.pointers import LATEST_POINTER, read_pointer
from cloudckpt.storage.faults import Fault, FaultyStorage

CRASHES = {
    # the manifest of epoch 3 is stored, then the process dies: no pointer moved, no prune
    "crash_after_manifest": lambda: Fault("put", kind="crash_after", key_prefix=epoch_name(3)),
    # latest has moved to epoch 3; the process dies before the best pointer put (the 3rd one:
    # epoch 1 creates it, epoch 2 improves, epoch 3 improves again)
    "crash_before_best_pointer": lambda: Fault("put", kind="crash_before", key_prefix="best_model_", nth=3),
}
#: epoch 3 (0.3) would be the new best; epoch 4 is worse than the old best (0.5); epoch 5 beats all
SCRIPT = [1.0, 0.5, 0.3, 0.6, 0.1]


def _callback(store) -> CheckpointCallback:
    return CheckpointCallback(store, save_frequency=1, save_best=True, keep_last_n=1, save_on_exception=False)


def _crashed_run(crash: str):
    inner = MemoryStorage()
    params = {}
    record = Hook(epoch=lambda trainer, epoch, metrics: params.setdefault(
        epoch, {k: v.clone() for k, v in trainer.model.state_dict().items()}))
    store = FaultyStorage(inner, [CRASHES[crash]()])
    run = ScriptedRun([record, _callback(store)], max_epochs=len(SCRIPT), val_script=SCRIPT)
    with pytest.raises(SimulatedCrash):
        run.fit()
    assert store.injected == 1
    return inner, params


@pytest.mark.parametrize("crash", sorted(CRASHES))
def test_old_best_survives_a_crash_before_the_best_pointer_moves(crash):
    inner, params = _crashed_run(crash)
    assert epoch_name(3) in manifest_names(inner)  # committed
    assert read_pointer(inner, BEST).target == epoch_name(2)
    assert read_pointer(inner, BEST).value == pytest.approx(0.5)
    expected_latest = epoch_name(2) if crash == "crash_after_manifest" else epoch_name(3)
    assert pointer_target(inner, LATEST_POINTER) == expected_latest

    # a new process: restore(best) is the old best, bit for bit; restore(latest) the newest commit
    mgr = CheckpointManager(inner, monitor="val_loss")
    assert mgr.best().name == epoch_name(2)
    target = ScriptedRun([], max_epochs=1, seed=5).trainer.checkpoint_state()
    info = mgr.restore(target, which="best")
    assert info.name == epoch_name(2) and target["progress"].global_step == 4
    for key, value in target["model"].state_dict().items():
        assert torch.equal(value, params[2][key]), key
    assert mgr.restore(target).name == epoch_name(3)


@pytest.mark.parametrize("crash", sorted(CRASHES))
def test_next_better_save_moves_the_best_pointer_and_retention_respects_it_meanwhile(crash):
    inner, _ = _crashed_run(crash)
    seen = {}

    def after_epoch(trainer, epoch, metrics):
        seen[epoch] = (manifest_names(inner), pointer_target(inner, BEST))

    callback = _callback(inner)
    run = ScriptedRun([callback, Hook(epoch=after_epoch)], max_epochs=len(SCRIPT), val_script=SCRIPT)
    run.fit()
    assert callback.resumed_from.name == epoch_name(3)  # the newest commit, whatever latest said
    # the first save after the restart repairs the stale pointer: epoch 3 (0.3, committed before the
    # crash) is the best committed checkpoint, and retention keeps it although keep_last_n=1 alone
    # would drop it; epoch 4 (0.6) does not become best
    names_4, best_4 = seen[4]
    assert best_4 == epoch_name(3) and epoch_name(3) in names_4 and epoch_name(4) in names_4
    # epoch 5 (0.1) beats everything: the pointer moves, and the old best may go
    names_5, best_5 = seen[5]
    assert best_5 == epoch_name(5)
    assert read_pointer(inner, BEST).value == pytest.approx(0.1)
    assert epoch_name(2) not in names_5 and epoch_name(3) not in names_5
    mgr = CheckpointManager(inner, monitor="val_loss")
    assert mgr.best().name == epoch_name(5)
    target = ScriptedRun([], max_epochs=1).trainer.checkpoint_state()
    assert mgr.restore(target, which="best").name == epoch_name(5)


@pytest.mark.parametrize("crash", sorted(CRASHES))
def test_best_pointer_ends_on_the_best_committed_checkpoint(crash):
    inner, _ = _crashed_run(crash)
    # resumed at epoch 3 (0.3); epoch 4 scores 0.4: better than the stale pointer (0.5), worse than 0.3
    script = [1.0, 0.5, 0.3, 0.4]
    callback = CheckpointCallback(inner, save_frequency=1, save_best=True, save_on_exception=False)
    ScriptedRun([callback], max_epochs=len(script), val_script=script).fit()
    mgr = CheckpointManager(inner, monitor="val_loss")
    assert mgr.best().name == epoch_name(3)
