"""Promise 3 for pointers: latest only moves forward, best only on strict improvement, and the
run's best history (.cloudckpt/state.json) outlives the manager that wrote it."""

from __future__ import annotations

import json
import logging
import math
import threading

import pytest
import torch
from ckpt_util import make_store

from cloudckpt import CheckpointManager, MemoryStorage
from cloudckpt.pointers import (
    LATEST_POINTER,
    STATE_KEY,
    Pointer,
    advance_latest,
    best_pointer_key,
    read_pointer,
)


def _name(step: int) -> str:
    return f"checkpoint_step_{step:08d}.ckpt"


def _state(step: int) -> dict:
    return {"w": torch.full((4,), float(step)), "progress": {"step": step}}


def _mgr(store=None, **kwargs) -> CheckpointManager:
    return CheckpointManager(store if store is not None else MemoryStorage(), capture_rng=False, **kwargs)


def test_latest_only_moves_forward():
    mgr = _mgr()
    assert mgr.save(_state(5), step=5).pointers == (LATEST_POINTER,)
    info = mgr.save(_state(3), step=3)  # a zombie writer with an older step
    assert LATEST_POINTER not in info.pointers
    assert read_pointer(mgr.store, LATEST_POINTER) == Pointer(_name(5), 5)
    assert mgr.latest().step == 5
    target = _state(0)
    assert mgr.restore(target).step == 5 and target["w"][0].item() == 5.0
    assert mgr.save(_state(6), step=6).pointers == (LATEST_POINTER,)
    assert read_pointer(mgr.store, LATEST_POINTER).target == _name(6)


@pytest.mark.parametrize("mode, values, best_step", [
    ("min", [0.5, 0.5, 0.4, 0.6, 0.4], 3),   # tie at 0.5 keeps step 1; 0.4 at 3; later tie keeps 3
    ("max", [0.5, 0.5, 0.7, 0.6, 0.7], 3),
    ("min", [1.0, 2.0, 3.0], 1),
    ("max", [1.0, 2.0, 3.0], 3),
])
def test_best_moves_only_on_strict_improvement(mode, values, best_step):
    mgr = _mgr(monitor="val", mode=mode)
    history = []
    for step, value in enumerate(values, start=1):
        info = mgr.save(_state(step), step=step, metrics={"val": value})
        history.append(best_pointer_key("val") in info.pointers)
        assert read_pointer(mgr.store, best_pointer_key("val")).value is not None
    best = read_pointer(mgr.store, best_pointer_key("val"))
    assert best.target == _name(best_step) and best.step == best_step and best.mode == mode
    assert mgr.best().step == best_step
    assert _mgr(mgr.store, monitor="val", mode=mode).best().step == best_step
    target = _state(0)
    assert mgr.restore(target, which="best").step == best_step
    assert target["w"][0].item() == best_step
    # the pointer moved exactly when the value strictly beat every earlier one
    better = (lambda a, b: a < b) if mode == "min" else (lambda a, b: a > b)
    expected = [all(better(v, w) for w in values[:i]) for i, v in enumerate(values)]
    assert history == expected


@pytest.mark.parametrize("bad", [float("nan"), None, "missing", "no_metrics"])
def test_nan_or_missing_metric_never_becomes_best(bad, caplog):
    """NaN, None, or metrics without the monitored one: never best, with a warning naming the metric.
    A save with no metrics at all (a periodic save) is never best either (a warning is optional)."""
    mgr = _mgr(monitor="val", mode="min")
    metrics = {"missing": {"acc": 0.9}, "no_metrics": {}}.get(bad) if isinstance(bad, str) else {"val": bad}
    with caplog.at_level(logging.WARNING, logger="cloudckpt"):
        info = mgr.save(_state(1), step=1, metrics=metrics)
    assert best_pointer_key("val") not in info.pointers
    assert read_pointer(mgr.store, best_pointer_key("val")) is None
    assert mgr.best() is None
    if bad != "no_metrics":
        assert any("'val'" in r.getMessage() and r.levelno == logging.WARNING for r in caplog.records)

    mgr.save(_state(2), step=2, metrics={"val": 3.0})
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="cloudckpt"):
        info = mgr.save(_state(3), step=3, metrics=metrics)  # after a real best: still not best
    assert best_pointer_key("val") not in info.pointers
    assert read_pointer(mgr.store, best_pointer_key("val")).target == _name(2)
    assert mgr.best().step == 2
    if bad != "no_metrics":
        assert caplog.records


@pytest.mark.parametrize("backend", ["memory", "local", "s3"])
def test_racing_writers_leave_latest_at_the_highest_step(backend, request, tmp_path):
    store = make_store(backend, request, tmp_path)
    steps = [3, 17, 5, 11, 2, 13, 7, 19]
    for round_ in range(2 if backend == "s3" else 5):
        store.delete([LATEST_POINTER])
        barrier = threading.Barrier(len(steps))
        errors: list[BaseException] = []

        def advance(step: int, barrier=barrier, errors=errors) -> None:
            try:
                barrier.wait()
                advance_latest(store, Pointer(_name(step), step))
            except BaseException as exc:  # noqa: BLE001
                errors.append(exc)

        threads = [threading.Thread(target=advance, args=(s + round_,)) for s in steps]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors, errors
        assert read_pointer(store, LATEST_POINTER) == Pointer(_name(max(steps) + round_), max(steps) + round_)
    store.close()


def test_racing_managers_saving_leave_latest_at_the_highest_step():
    store = MemoryStorage()
    steps = [4, 9, 1, 8, 6, 2, 7, 3]
    barrier = threading.Barrier(len(steps))

    def save(step: int) -> None:
        barrier.wait()
        _mgr(store).save(_state(step), step=step)

    threads = [threading.Thread(target=save, args=(s,)) for s in steps]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert read_pointer(store, LATEST_POINTER).target == _name(9)
    assert [i.step for i in _mgr(store).list()] == sorted(steps)
    assert set(json.loads(store.get(STATE_KEY))["checkpoints"]) == {_name(s) for s in steps}


@pytest.mark.parametrize("mode", ["min", "max"])
def test_best_history_survives_a_new_manager_in_top_k_order(mode):
    store = MemoryStorage()
    values = {1: 0.9, 2: 0.3, 3: 0.7, 4: 0.3, 5: float("nan")}
    mgr = _mgr(store, monitor="loss", mode=mode, top_k=3)
    for step in (1, 2, 3):
        mgr.save(_state(step), step=step, metrics={"loss": values[step]})
    mgr.close()

    again = _mgr(store, monitor="loss", mode=mode, top_k=3)  # e.g. the job restarted
    for step in (4, 5):
        again.save(_state(step), step=step, metrics={"loss": values[step]})
    body = json.loads(store.get(STATE_KEY))
    history = body["best_history"]["loss"]
    finite = {s: v for s, v in values.items() if not math.isnan(v)}
    sign = 1 if mode == "min" else -1
    expected = sorted(finite, key=lambda s: (sign * finite[s], s))[:3]
    assert [h["step"] for h in history] == expected
    assert [h["value"] for h in history] == [finite[s] for s in expected]
    assert [h["name"] for h in history] == [_name(s) for s in expected]
    assert set(body["checkpoints"]) == {_name(s) for s in values}
    # and the best pointer agrees with the head of the history (ties keep the earlier step)
    assert read_pointer(store, best_pointer_key("loss")).step == expected[0]
