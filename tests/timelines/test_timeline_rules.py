"""The timeline rules in detail, on the in-memory store (fast): what is live, what a stale reader
sees, going back to abandoned work, KeepSuperseded, and gc --superseded."""

from __future__ import annotations

import datetime as _dt
import logging

from timeline_util import blank, invoke, manager, name, restored, same, save_run, state

from cloudckpt import KeepLastN, KeepSuperseded, MemoryStorage, SweepConfig
from cloudckpt.format.manifest import MAIN_TIMELINE


def _fork_at_100(store) -> None:
    save_run(manager(store), (100, 200, 300))
    mgr = manager(store)
    mgr.restore(blank(), which=100)
    save_run(mgr, (200, 300), "b")


def test_a_reader_that_cached_the_abandoned_manifests_follows_the_fork():
    store = MemoryStorage()
    save_run(manager(store), (100, 200, 300))
    reader = manager(store)
    assert reader.latest().name == name(300)               # reader has parsed (and cached) run a
    writer = manager(store)
    writer.restore(blank(), which=100)
    save_run(writer, (200, 300), "b")
    target = blank()
    assert reader.restore(target).name == name(300) and same(target, state(300, "b"))
    reader.prune()                                         # must not move the live 200/300 aside
    assert restored(store)[0] == name(300) and same(restored(store)[1], state(300, "b"))


def test_going_back_to_abandoned_work(caplog):
    store = MemoryStorage()
    _fork_at_100(store)
    mgr = manager(store)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="cloudckpt"):
        report = mgr.rollback(to=f"timeline:{MAIN_TIMELINE}")   # changed our mind: run a's step 300
    assert report.target.lineage.timeline == MAIN_TIMELINE and report.target.step == 300
    got, target = restored(store)
    assert got == name(300) and same(target, state(300))
    live = {(i.name, i.timeline) for i in manager(store).list()}
    assert live == {(name(100), MAIN_TIMELINE), (name(300), MAIN_TIMELINE)}
    assert sum("branching" in r.getMessage() or "new timeline" in r.getMessage() for r in caplog.records) == 1


def test_superseded_checkpoints_go_only_by_keep_superseded_or_gc():
    store = MemoryStorage()
    _fork_at_100(store)
    now = [_dt.datetime.now(_dt.timezone.utc)]
    clock = SweepConfig(grace=_dt.timedelta(0), clock=lambda: now[0])
    mgr = manager(store, retention=KeepLastN(1), cleanup=clock)
    mgr.prune()
    assert sorted(i.step for i in mgr.list(superseded=True) if i.superseded) == [200, 300]
    mgr = manager(store, retention=KeepLastN(1) | KeepSuperseded(days=7), cleanup=clock)
    mgr.prune()
    assert sorted(i.step for i in mgr.list(superseded=True) if i.superseded) == [200, 300]  # younger than 7 days
    now[0] += _dt.timedelta(days=8)
    report = mgr.prune()
    assert [i for i in mgr.list(superseded=True) if i.superseded] == []
    assert sorted(report.checkpoints_removed)[-2:] == [f"superseded/{MAIN_TIMELINE}/{name(200)}",
                                                       f"superseded/{MAIN_TIMELINE}/{name(300)}"]


def test_gc_superseded_on_a_local_root(tmp_path):
    root = str(tmp_path / "run")
    from cloudckpt.storage.local import LocalStorage

    _fork_at_100(LocalStorage(root))
    dry = invoke("gc", root, "--superseded")
    assert dry.returncode == 0 and f"superseded/{MAIN_TIMELINE}/{name(300)}" in dry.stdout, str(dry)
    done = invoke("gc", root, "--superseded", "--yes", "--grace", "0")
    assert done.returncode == 0, str(done)
    listing = invoke("ls", root, "--json").json()
    assert listing["superseded"] == [] and [c["step"] for c in listing["checkpoints"]] == [100, 200, 300]
