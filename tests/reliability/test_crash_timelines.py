"""A crash before or after EVERY storage call of a rollback, and of a quarantine, leaves a root that
resolves to one well-defined checkpoint; retrying the operation (or just saving) finishes the job.

The crash is final (:class:`reliability_util.DyingStorage`).  After each one a new manager must find:
* rollback: ``latest`` is the old newest (step 300) if the timeline record did not change, else the
  rollback target (step 100); it restores and verifies; no checkpoint is lost (all three are live or
  superseded); the operator's retried rollback, a restore and a save then give a clean root.
* quarantine (by a restore that meets a damaged newest manifest): ``latest`` is step 100; the
  damaged manifest is at the top or under quarantine/ (never lost silently, never restored); the
  next save of step 200 succeeds and becomes ``latest``.
"""

from __future__ import annotations

import json

import pytest
import torch
from reliability_util import DyingStorage, blank_like, report, same_state

from cloudckpt import CheckpointManager, MemoryStorage
from cloudckpt.aside import list_quarantined
from cloudckpt.errors import SimulatedCrash
from cloudckpt.storage.faults import Fault
from cloudckpt.timeline import TIMELINE_KEY


def _name(step: int) -> str:
    return f"checkpoint_step_{step:08d}.ckpt"


def _state(step: int, run: str = "a") -> dict:
    g = torch.Generator().manual_seed(step + (0 if run == "a" else 10_000))
    return {"w": torch.randn(2000, generator=g), "progress": {"step": step, "run": run}}


def _manager(store) -> CheckpointManager:
    return CheckpointManager(store, monitor="loss", capture_rng=False)


def _template(damaged: bool) -> MemoryStorage:
    store = MemoryStorage()
    mgr = _manager(store)
    for step in (100, 200) if damaged else (100, 200, 300):
        mgr.save(_state(step), step=step, metrics={"loss": 1.0 / step})
    if damaged:
        store.put(_name(200), store.get(_name(200)).replace(b'"step": 200', b'"step": 201', 1))
    return store


def _copy(src: MemoryStorage) -> MemoryStorage:
    dst = MemoryStorage()
    for info in src.list(""):
        dst.put(info.key, src.get(info.key))
    return dst


def _sweep(template: MemoryStorage, operation) -> tuple[list, list]:
    """Run ``operation(manager)`` once to count its calls, then crash at each; yield the roots."""
    counting = DyingStorage(_copy(template))
    operation(_manager(counting))
    calls = list(counting.calls)
    roots = []
    for kind in ("crash_before", "crash_after"):
        for i in range(len(calls)):
            inner = _copy(template)
            dying = DyingStorage(inner, [Fault(None, nth=i + 1, kind=kind)])
            with pytest.raises(SimulatedCrash):
                operation(_manager(dying))
            roots.append((f"{kind} call {i + 1}/{len(calls)} {calls[i]}", inner))
    return calls, roots


def test_crash_at_every_storage_call_of_a_rollback():
    calls, roots = _sweep(_template(damaged=False), lambda mgr: mgr.rollback(to=100))
    problems, outcomes = [], {100: 0, 300: 0}
    for where, store in roots:
        reader = _manager(store)
        forked = store.list(TIMELINE_KEY) != []
        expected = 100 if forked else 300
        target = blank_like(_state(0))
        info = reader.restore(target)
        everything = {(i.step, i.superseded) for i in reader.list(superseded=True)}
        if info is None or info.step != expected or not same_state(target, _state(expected)):
            problems.append(f"{where}: restored {info and info.name}, expected step {expected}")
            continue
        if {step for step, _ in everything} != {100, 200, 300}:
            problems.append(f"{where}: checkpoints lost: {everything}")
        if reader.best() is None or reader.best().step != expected:
            problems.append(f"{where}: best is {reader.best()}")
        reader.verify()
        outcomes[expected] += 1
        # the operator retries; the job resumes and trains on
        reader.rollback(to=100)
        job = _manager(store)
        job.restore(blank_like(_state(0)))
        job.save(_state(200, "b"), step=200, metrics={"loss": 0.001})
        job.prune()
        final = {(i.step, i.superseded) for i in job.list(superseded=True)}
        if job.latest().name != _name(200) or final != {(100, False), (200, False), (200, True), (300, True)}:
            problems.append(f"{where}: after the retry: latest {job.latest()}, {final}")
    report(f"[crash-timelines] rollback makes {len(calls)} storage calls; crash points tried: {len(roots)}, "
           f"resolved to the old newest / the rollback target: {outcomes[300]}/{outcomes[100]}, "
           f"problems: {len(problems)}")
    assert not problems, "\n".join(problems[:20])
    assert outcomes[100] and outcomes[300]


def test_crash_at_every_storage_call_of_a_quarantine():
    def restore(mgr: CheckpointManager) -> None:
        assert mgr.restore(blank_like(_state(0))).step == 100

    calls, roots = _sweep(_template(damaged=True), restore)
    assert any(verb == "copy" for verb, _ in calls) and any(verb == "delete" for verb, _ in calls), calls
    problems, moved = [], 0
    for where, store in roots:
        quarantined = [q for q in list_quarantined(store) if q.name == _name(200)]
        at_top = [i.key for i in store.list("") if i.key == _name(200)]
        if not quarantined and not at_top:
            problems.append(f"{where}: the damaged manifest vanished")
        moved += bool(quarantined) and not at_top
        target = blank_like(_state(0))
        info = _manager(store).restore(target)
        if info is None or info.step != 100 or not same_state(target, _state(100)):
            problems.append(f"{where}: restored {info and info.name}")
            continue
        job = _manager(store)
        job.restore(blank_like(_state(0)))
        job.save(_state(200, "b"), step=200, metrics={"loss": 0.001})
        target = blank_like(_state(0))
        if _manager(store).restore(target).name != _name(200) or not same_state(target, _state(200, "b")):
            problems.append(f"{where}: step 200 was not saved again")
        reasons = [json.loads(store.get(k)) for k in (i.key for i in store.list("quarantine/"))
                   if k.endswith("reason.json")]
        if not any("checksum" in r["reason"] for r in reasons):
            problems.append(f"{where}: no quarantine reason recorded: {reasons}")
    report(f"[crash-timelines] a quarantining restore makes {len(calls)} storage calls; crash points tried: "
           f"{len(roots)}, moved aside before the crash: {moved}, problems: {len(problems)}")
    assert not problems, "\n".join(problems[:20])
