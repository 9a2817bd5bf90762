"""LocalStorage makes directory changes durable the way POSIX requires (issue 12, item 6): an fsync
of the directory after a file gets its name, of the parent after a directory is created, and of the
directory after deletes."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from cloudckpt.storage.local import LocalStorage


@pytest.fixture
def synced(monkeypatch) -> list[Path]:
    """The paths passed to os.fsync, in order (directories and files alike)."""
    seen: list[Path] = []
    real = os.fsync

    def spy(fd: int) -> None:
        seen.append(Path(os.readlink(f"/proc/self/fd/{fd}")))
        real(fd)

    monkeypatch.setattr(os, "fsync", spy)
    return seen


def test_a_chunk_in_new_directories_syncs_each_new_directory_and_its_name(tmp_path, synced):
    store = LocalStorage(tmp_path / "root")
    store.put("chunks/ab/abcd", b"data")
    root = tmp_path / "root"
    dirs = [p for p in synced if p.is_dir()]
    # root, chunks/ and chunks/ab/ were created: each parent is synced; then the rename into chunks/ab/.
    assert dirs == [tmp_path, root, root / "chunks", root / "chunks" / "ab"]
    synced.clear()
    store.put("chunks/ab/abce", b"more")  # the directories exist: only the new name is synced
    assert [p for p in synced if p.is_dir()] == [root / "chunks" / "ab"]


def test_deletes_sync_their_directories(tmp_path, synced):
    store = LocalStorage(tmp_path / "root")
    store.put("a.ckpt", b"m")
    store.put("chunks/ab/abcd", b"c")
    synced.clear()
    store.delete(["a.ckpt", "chunks/ab/abcd", "chunks/ab/missing"])
    assert sorted(synced) == sorted([tmp_path / "root", tmp_path / "root" / "chunks" / "ab"])


def test_without_fsync_nothing_is_synced(tmp_path, synced):
    store = LocalStorage(tmp_path / "root", fsync=False)
    store.put("chunks/ab/abcd", b"data")
    store.delete(["chunks/ab/abcd"])
    assert synced == []
