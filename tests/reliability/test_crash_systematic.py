"""Promise 1 and 3 under retention: a crash before or after EVERY storage call of a save that
also prunes (KeepLastN(2), cleanup="delete", grace 0) leaves a root a new process can use.

tests/checkpoint/test_crash_consistency.py crashes a plain save (no retention) with the lenient
FaultyStorage, where clean-up handlers still run after the "crash".  Here the crash is final
(:class:`DyingStorage`: nothing runs after it, as after a kill), the save deletes an old
checkpoint and sweeps its chunks, chunks go up as multipart uploads (so a crash can strand
one), and both the sync and the async manager are tried, on memory and on a local directory.

After each crash, a new manager must find:
* ``latest`` restores, verifies, and is the old checkpoint (step 2) or the new one (step 3);
  it is the new one whenever its manifest is committed;
* every visible manifest is complete (each chunk present and verified); step 2 is never lost;
* no pointer names a missing checkpoint;
and a later save plus ``prune()`` with the grace period and upload age elapsed leaves a clean
root: no unreferenced chunk, no pending multipart upload, no temporary file.
"""

from __future__ import annotations

import datetime as _dt
import os
import shutil
import tempfile
from pathlib import Path

import pytest
from reliability_util import (
    KiB,
    Clock,
    DyingStorage,
    audit,
    blank_like,
    report,
    same_state,
    step_state,
)

from cloudckpt import CheckpointManager, KeepLastN, MemoryStorage, SweepConfig, TransferConfig
from cloudckpt.errors import SimulatedCrash
from cloudckpt.storage.faults import Fault

OLD, NEW = 2, 3


def _transfer(concurrency: int) -> TransferConfig:
    # 64 KiB chunks above a 48 KiB threshold go up as multipart uploads of 16 KiB parts.
    return TransferConfig(chunk_size=64 * KiB, pack_threshold=8 * KiB, concurrency=concurrency,
                          multipart_threshold=48 * KiB, part_size=16 * KiB)


def _state(step: int) -> dict:
    # "shared" (one 64 KiB chunk) is the same in every step; "w" (120 KB: two chunks) is new in each.
    return step_state(step)


def _make_store(backend: str, tmp_path: Path, clock: Clock):
    if backend == "memory":
        return MemoryStorage(clock=clock)
    from cloudckpt.storage.local import LocalStorage

    return LocalStorage(tmp_path)  # fsync on, as users run it


def _manager(store, clock: Clock, *, async_save: bool, concurrency: int) -> CheckpointManager:
    return CheckpointManager(
        store, retention=KeepLastN(2), async_save=async_save, transfer=_transfer(concurrency),
        capture_rng=False,
        cleanup=SweepConfig(cleanup="delete", grace=_dt.timedelta(0),
                            stale_upload_age=_dt.timedelta(hours=1), clock=clock),
    )


def _save(mgr: CheckpointManager, step: int) -> None:
    mgr.save(_state(step), step=step)
    mgr.wait()


def _copy(src, dst) -> None:
    for info in src.list(""):
        dst.put(info.key, src.get(info.key))


class _Template:
    """Steps 1 and 2 saved once; each trial starts from a copy of those bytes (much faster)."""

    def __init__(self, backend: str, tmp_path: Path) -> None:
        self.backend = backend
        self.tmp_path = tmp_path
        clock = Clock()
        self.store = _make_store(backend, tmp_path / "template", clock)
        mgr = _manager(self.store, clock, async_save=False, concurrency=4)
        _save(mgr, 1)
        _save(mgr, OLD)

    def new_root(self, name: str, *, async_save: bool, concurrency: int):
        """A copy of the template, and a new manager (a restarted job) on it behind a DyingStorage."""
        clock = Clock()
        inner = _make_store(self.backend, self.tmp_path / name, clock)
        _copy(self.store, inner)
        faulty = DyingStorage(inner)
        return clock, inner, faulty, _manager(faulty, clock, async_save=async_save, concurrency=concurrency)


def _temp_files(backend: str, root: Path) -> list[str]:
    if backend != "local":
        return []
    found = [str(p) for p in root.rglob("*") if p.is_file() and ".cloudckpt-tmp-" in p.name]
    uploads = root / ".cloudckpt-uploads"
    if uploads.is_dir():
        found += [str(p) for p in uploads.iterdir()]
    return found


CONFIGS = [
    pytest.param("memory", False, 1, id="memory-sync"),
    pytest.param("memory", True, 4, id="memory-async-4threads"),
    pytest.param("local", False, 4, id="local-sync-4threads"),
    pytest.param("local", True, 1, id="local-async"),
]


@pytest.fixture
def roots_dir(tmp_path):
    """Where the trial roots live: a tmpfs when there is room on one.  Each of the ~80 trials
    fsyncs dozens of files, and the crashes here are simulated at the storage calls, so the
    disk's durability is not under test (test_local_durability.py tests fsync)."""
    shm = Path("/dev/shm")
    if not (shm.is_dir() and os.access(shm, os.W_OK) and shutil.disk_usage(shm).free > 256 * 2**20):
        yield tmp_path
        return
    with tempfile.TemporaryDirectory(dir=shm, prefix="cloudckpt-crash-") as where:
        yield Path(where)


@pytest.mark.parametrize("backend, async_save, concurrency", CONFIGS)
def test_crash_before_and_after_every_storage_call_of_a_pruning_save(
        backend, async_save, concurrency, roots_dir):
    tmp_path = roots_dir
    label = f"{backend}-{'async' if async_save else 'sync'}-c{concurrency}"
    # A clean run first, to count the storage calls of save 3 (commit + pointers + retention + sweep).
    template = _Template(backend, tmp_path)
    _, _, faulty, mgr = template.new_root("count", async_save=async_save, concurrency=concurrency)
    first = len(faulty.calls)
    _save(mgr, NEW)
    calls = faulty.calls[first:]
    verbs = {verb for verb, _ in calls}
    assert {"multipart", "upload_part", "complete", "put", "delete", "list_pending_uploads"} <= verbs, verbs

    tried = partial = lost = dangling = unclean = 0
    outcomes = {OLD: 0, NEW: 0}
    problems: list[str] = []
    for kind in ("crash_before", "crash_after"):
        for i in range(len(calls)):
            where = f"{label}: {kind} call {i + 1}/{len(calls)} {calls[i]}"
            root = tmp_path / f"{kind}-{i}"
            clock, inner, faulty, mgr = template.new_root(root.name, async_save=async_save,
                                                          concurrency=concurrency)
            faulty.faults = [Fault(None, nth=i + 1, kind=kind)]  # counted from the start of save 3
            with pytest.raises(SimulatedCrash):
                _save(mgr, NEW)
            tried += 1

            # -- what a new process finds -------------------------------------------------------
            found = audit(inner)
            if found["partial"] or found["missing"]:
                partial += 1
                problems.append(f"{where}: partial {found['partial']} missing {sorted(found['missing'])}")
            if found["dangling"]:
                dangling += 1
                problems.append(f"{where}: dangling pointer {found['dangling']}")
            names = found["names"]
            reader = _manager(inner, clock, async_save=False, concurrency=4)
            try:
                target = blank_like(_state(0))
                info = reader.restore(target)
                ok = (info is not None and info.step in (OLD, NEW) and same_state(target, _state(info.step))
                      and f"checkpoint_step_{OLD:08d}.ckpt" in names
                      and (info.step == NEW) == (f"checkpoint_step_{NEW:08d}.ckpt" in names))
                reader.verify()
            except Exception as exc:  # noqa: BLE001 - counted and reported below
                ok, info = False, None
                problems.append(f"{where}: restore failed: {type(exc).__name__}: {exc}")
            if not ok:
                lost += 1
                problems.append(f"{where}: latest {info} with {names}")
            else:
                outcomes[info.step] += 1

            # -- a later save and prune, once the grace period and the upload age have passed ----
            clock.advance(_dt.timedelta(days=2))
            _save(reader, 4)
            reader.prune()
            after = audit(inner)
            expected = {f"checkpoint_step_{s:08d}.ckpt" for s in (info.step if info else OLD, 4)}
            leftovers = _temp_files(backend, root)
            if (after["unreferenced"] or after["missing"] or after["pending"] or after["partial"]
                    or set(after["names"]) != expected or leftovers):
                unclean += 1
                problems.append(f"{where}: not clean after recovery: names {after['names']} "
                                f"unreferenced {len(after['unreferenced'])} pending {after['pending']} "
                                f"temp files {leftovers}")
            shutil.rmtree(root, ignore_errors=True)  # checked: free the space (a small tmpfs)
    report(f"[crash-systematic] {label}: save 3 makes {len(calls)} storage calls; crash points tried: {tried}, "
           f"partial checkpoints visible: {partial}, data lost: {lost}, dangling pointers: {dangling}, "
           f"latest restored old/new: {outcomes[OLD]}/{outcomes[NEW]}, "
           f"clean after a later save + prune: {tried - unclean}/{tried}")
    assert not problems, "\n".join(problems[:20])
    assert tried == 2 * len(calls)
    assert outcomes[OLD] > 0 and outcomes[NEW] > 0


def test_temp_files_of_a_killed_local_write_are_swept_eventually(tmp_path):
    from cloudckpt.storage.local import LocalStorage

    clock = Clock()
    store = LocalStorage(tmp_path)
    mgr = _manager(store, clock, async_save=False, concurrency=1)
    _save(mgr, 1)
    # What a kill between the write of the temporary file and its link/rename leaves behind:
    chunk = store.list("chunks/")[0].key
    orphan = tmp_path / chunk
    orphan = orphan.with_name(f".{orphan.name}.cloudckpt-tmp-0123456789abcdef")
    orphan.write_bytes(b"x" * 1000)
    clock.advance(_dt.timedelta(days=2))
    _save(mgr, 2)
    mgr.prune()
    assert not orphan.exists(), "the temporary file of an interrupted write is never removed"
