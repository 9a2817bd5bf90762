"""Promise 3 with two writers on one root: the old instance of a job is not dead yet (a "zombie")
when its replacement starts.  No checkpoint is lost, pointers never move backwards, and the
garbage collection of one writer never removes chunks the other is about to commit.

The step-by-step tests pause a writer right before its commit (the create-only manifest put)
with :class:`reliability_util.PausingStorage`, let the other writer save and prune, then let
the first commit.
"""

from __future__ import annotations

import datetime as _dt
import threading

import pytest
import torch
from reliability_util import (
    Clock,
    PausingStorage,
    audit,
    blank_like,
    report,
    same_state,
)

from cloudckpt import (
    AlreadyExists,
    TimelineSuperseded,
    CheckpointManager,
    KeepLastN,
    MemoryStorage,
    SweepConfig,
    TransferConfig,
)
from cloudckpt.pointers import LATEST_POINTER, best_pointer_key, read_pointer
from cloudckpt.storage.local import LocalStorage
from cloudckpt.timeline import read_live

KiB = 1024
TRANSFER = TransferConfig(chunk_size=32 * KiB, pack_threshold=4 * KiB, concurrency=2)
BEST = best_pointer_key("loss")


def _state(step: int, writer: str) -> dict:
    """A state unique to (step, writer): a checkpoint's bytes tell which writer committed it."""
    g = torch.Generator().manual_seed(step * 100 + ord(writer))
    return {"model": {"w": torch.randn(20_000, generator=g), "b": torch.randn(16, generator=g)},
            "progress": {"step": step, "writer": writer}}


def _name(step: int) -> str:
    return f"checkpoint_step_{step:08d}.ckpt"


def _manager(store, **options) -> CheckpointManager:
    options.setdefault("transfer", TRANSFER)
    return CheckpointManager(store, capture_rng=False, monitor="loss", **options)


def _restores_as(store, name: str, expected: dict) -> bool:
    target = blank_like(expected)
    reader = _manager(store)
    reader.restore(target, which=name)
    reader.verify(name)
    return same_state(target, expected)


# -- threads: a zombie and its replacement saving at the same time ------------------------------------
def test_zombie_and_replacement_saving_concurrently(tmp_path):
    store = LocalStorage(tmp_path / "root", fsync=False)
    zombie = _manager(store, retention=KeepLastN(3))
    for step in range(1, 5):
        zombie.save(_state(step, "A"), step=step, metrics={"loss": 1.0 / step})

    seen_steps: list[int] = []
    stop = threading.Event()

    def watch() -> None:  # every value latest.ckpt takes, as fast as we can read it
        while not stop.is_set():
            pointer = read_pointer(store, LATEST_POINTER)
            if pointer is not None and (not seen_steps or seen_steps[-1] != pointer.step):
                seen_steps.append(pointer.step)

    committed: dict[int, str] = {}
    commits = 0
    refused: list[tuple[str, int]] = []
    lock = threading.Lock()

    def run(writer: str, mgr: CheckpointManager, steps: range) -> None:
        nonlocal commits
        for step in steps:
            try:
                mgr.save(_state(step, writer), step=step, metrics={"loss": 1.0 / step})
            except (AlreadyExists, TimelineSuperseded):
                # a name the other writer committed; or, once the replacement's save found the zombie's
                # newer checkpoint and forked a new timeline from its own restore, the zombie is cut off
                with lock:
                    refused.append((writer, step))
            else:
                with lock:
                    # a step is committed twice only when the replacement forked past the zombie's
                    assert step not in committed or (committed[step], writer) == ("A", "B"), step
                    committed[step] = writer
                    commits += 1

    replacement = _manager(store, retention=KeepLastN(3))
    resumed = replacement.restore(blank_like(_state(0, "A")))
    assert resumed.step == 4
    watcher = threading.Thread(target=watch)
    threads = [threading.Thread(target=run, args=("A", zombie, range(5, 13))),   # the zombie goes on
               threading.Thread(target=run, args=("B", replacement, range(5, 15)))]
    watcher.start()
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    stop.set()
    watcher.join(10)

    # The one backward move allowed is a fork's: when the replacement saves past checkpoints the zombie
    # committed after the replacement's restore, it forks a new timeline at its restore point and
    # points latest.ckpt there before it moves the abandoned ones aside (docs/DESIGN.md section 13).
    fork_steps = {f.get("from_step") for f in read_live(store).forks}
    backwards = [(a, b) for a, b in zip(seen_steps, seen_steps[1:]) if b < a]
    assert all(b in fork_steps for _, b in backwards), f"latest.ckpt moved backwards: {seen_steps}, forks {fork_steps}"
    assert read_pointer(store, LATEST_POINTER).step == 14
    found = audit(store)
    assert not found["partial"] and not found["missing"] and not found["dangling"], found
    assert found["names"] == [_name(s) for s in (12, 13, 14)]  # KeepLastN(3) over both writers' saves
    for name in found["names"]:
        step = int(name[16:24])
        assert _restores_as(store, name, _state(step, committed[step])), name
    assert commits + len(refused) == 8 + 10 and all(step in committed for _, step in refused)
    report(f"[zombie] two writers saving at once: {len(committed)} checkpoints committed "
           f"(A {sum(w == 'A' for w in committed.values())}, B {sum(w == 'B' for w in committed.values())}), "
           f"{len(refused)} same-name saves refused with AlreadyExists, latest.ckpt took {len(seen_steps)} values, "
           f"moved back to a fork point: {len(backwards)}, checkpoints lost: 0")


def test_a_late_writer_never_moves_pointers_backwards():
    store = MemoryStorage()
    replacement = _manager(store)
    replacement.save(_state(10, "B"), step=10, metrics={"loss": 0.1})
    zombie = _manager(store)
    info = zombie.save(_state(5, "A"), step=5, metrics={"loss": 0.5})  # older step, worse metric
    assert info.pointers == ()
    assert read_pointer(store, LATEST_POINTER).target == _name(10)
    assert read_pointer(store, BEST).target == _name(10)
    with pytest.raises(AlreadyExists):  # the same name as the replacement's: refused, B's is kept
        zombie.save(_state(10, "A"), step=10, metrics={"loss": 0.01})
    assert _restores_as(store, _name(10), _state(10, "B"))
    info = zombie.save(_state(6, "A"), step=6, metrics={"loss": 0.05})  # a better metric does move best
    assert info.pointers == (BEST,)
    assert read_pointer(store, LATEST_POINTER).target == _name(10)
    target = blank_like(_state(0, "A"))
    assert _manager(store).restore(target).name == _name(10) and same_state(target, _state(10, "B"))


# -- step by step: prune by one writer while the other is about to commit --------------------------------
@pytest.mark.parametrize("async_save", [False, True], ids=["sync", "async"])
def test_prune_never_removes_chunks_the_other_writer_is_about_to_commit(async_save):
    inner = MemoryStorage()
    first = _manager(inner, retention=KeepLastN(1))          # the normal grace period (6 h)
    first.save(_state(1, "A"), step=1, metrics={"loss": 1.0})
    first.save(_state(2, "A"), step=2, metrics={"loss": 0.9})

    paused = PausingStorage(inner)
    second = _manager(paused, async_save=async_save)
    gate = paused.pause_next_commit()
    result: dict = {}

    def save_second() -> None:
        saved = second.save(_state(10, "B"), step=10, metrics={"loss": 0.5})
        result["info"] = saved.result(30) if async_save else saved

    thread = threading.Thread(target=save_second)
    thread.start()
    assert gate.reached.wait(30), "the second writer never reached its commit"
    uploaded = {key for verb, key in paused.calls if verb == "put" and key.startswith("chunks/")}
    assert uploaded, "the second writer uploaded no chunk"

    first.save(_state(3, "A"), step=3, metrics={"loss": 0.8})  # its retention prunes 1 and 2 ...
    swept = first.prune()                                      # ... and an explicit prune, too
    assert swept.chunks_too_young >= len(uploaded)
    assert all(inner.head(key) for key in uploaded)
    gate.release()
    thread.join(30)
    assert result["info"].name == _name(10)
    assert _restores_as(inner, _name(10), _state(10, "B"))
    after = first.prune()  # now its manifest protects them
    assert _restores_as(inner, _name(10), _state(10, "B"))
    found = audit(inner)
    assert not found["partial"] and not found["missing"], found
    report(f"[zombie] prune during the other writer's save ({'async' if async_save else 'sync'}): "
           f"{len(uploaded)} uploaded-but-uncommitted chunks, {swept.chunks_too_young} kept as too young, "
           f"0 removed; the commit that followed restores and verifies; later prune removed "
           f"{after.chunks_removed} chunks")


def test_dedup_never_relies_on_chunks_the_other_writers_retention_swept():
    clock = Clock()
    inner = MemoryStorage(clock=clock)
    sweep = SweepConfig(clock=clock)  # cleanup="delete", the normal grace of 6 hours
    first = _manager(inner, retention=KeepLastN(1), cleanup=sweep)
    first.save(_state(1, "A"), step=1, metrics={"loss": 1.0})
    clock.advance(_dt.timedelta(hours=7))  # a long run: checkpoint 1's chunks are now older than the grace

    paused = PausingStorage(inner)
    second = _manager(paused, cleanup=sweep)  # e.g. the replacement job, re-saving the state it resumed
    gate = paused.pause_next_commit()
    result: dict = {}
    thread = threading.Thread(target=lambda: result.setdefault(
        "info", second.save(_state(1, "A"), step=10, metrics={"loss": 0.5})))
    thread.start()
    assert gate.reached.wait(30)
    reused = [key for verb, key in paused.calls if verb == "put" and key.startswith("chunks/")]
    assert reused == []  # every chunk was deduplicated against checkpoint 1

    swept = first.save(_state(2, "A"), step=2, metrics={"loss": 0.9})  # deletes 1, sweeps its chunks
    gate.release()
    thread.join(30)
    assert result["info"].name == _name(10)  # the save reported success ...
    assert swept is not None
    target = blank_like(_state(0, "A"))
    _manager(inner).restore(target, which=_name(10))  # ... but its chunks are gone: CorruptCheckpoint
    _manager(inner).verify(_name(10))
