"""A local root holds checkpoints and nothing else: no lock files, no empty staging directory,
while compare-and-swap stays exclusive even though lock files come and go."""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

import cloudckpt
from cloudckpt.errors import PreconditionFailed
from cloudckpt.storage.base import IfMatch
from cloudckpt.storage.local import LocalStorage


def _internal_leftovers(root: Path) -> list[str]:
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        here = Path(dirpath)
        found += [str((here / d).relative_to(root)) for d in dirnames if d.startswith(".cloudckpt-")]
        found += [str((here / f).relative_to(root)) for f in filenames if ".cloudckpt-" in f]
    return sorted(found)


def test_a_run_leaves_no_lock_files_and_no_staging_directory(tmp_path):
    root = tmp_path / "run"
    model = torch.nn.Linear(64, 64)
    # Small parts, so that every checkpoint goes through multipart uploads.
    transfer = cloudckpt.TransferConfig(chunk_size=8192, pack_threshold=1024, multipart_threshold=4096,
                                        part_size=4096)
    with cloudckpt.CheckpointManager(root, monitor="loss", retention=cloudckpt.KeepLastN(2),
                                     transfer=transfer) as mgr:
        for step in (1, 2, 3):
            with torch.no_grad():
                model.weight.add_(1.0)
            mgr.save({"model": model}, step=step, metrics={"loss": 1.0 / step})
        mgr.pin("checkpoint_step_00000003.ckpt")
        assert len(mgr.list()) == 2
    assert (root / "latest.ckpt").exists()
    assert _internal_leftovers(root) == []


def test_an_aborted_multipart_upload_leaves_nothing(tmp_path):
    store = LocalStorage(tmp_path / "run")
    first, second = store.multipart("a/one"), store.multipart("a/two")
    first.upload_part(1, b"x")
    second.upload_part(1, b"y")
    first.abort()
    assert (tmp_path / "run" / ".cloudckpt-uploads").is_dir()  # the other upload is still in progress
    second.complete()
    assert store.get("a/two") == b"y"
    assert _internal_leftovers(tmp_path / "run") == []


def test_compare_and_swap_stays_exclusive_while_lock_files_are_removed(tmp_path):
    """Many writers increment one counter with read + put(IfMatch): no increment may be lost, which
    would happen if two of them held the key's lock at once (e.g. one on a removed lock file)."""
    store = LocalStorage(tmp_path / "run", fsync=False)
    store.put("counter", b"0")
    writers, increments = 8, 40

    def increment(_: int) -> int:
        conflicts = 0
        for _ in range(increments):
            while True:
                token = store.head("counter").token
                value = int(store.get("counter"))
                try:
                    store.put("counter", str(value + 1).encode(), mode=IfMatch(token))
                    break
                except PreconditionFailed:
                    conflicts += 1
        return conflicts

    with ThreadPoolExecutor(writers) as pool:
        conflicts = sum(pool.map(increment, range(writers)))
    assert int(store.get("counter")) == writers * increments
    assert conflicts > 0  # the writers really raced
    assert _internal_leftovers(tmp_path / "run") == []
