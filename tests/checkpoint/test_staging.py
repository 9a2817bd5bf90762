"""The staging pool a restore verifies chunks in: bounded, reused, pinned only for CUDA destinations."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from cloudckpt import MemoryStorage, NotFound, TransferConfig
from cloudckpt.storage.local import LocalStorage
from cloudckpt.reader import load_manifest
from cloudckpt.staged_read import stage_tensors
from cloudckpt.staging import StagingPool, byte_view, copy_bytes, settle, wants_pinned
from cloudckpt.writer import write_checkpoint

KiB = 1024


def test_the_pool_never_holds_more_than_its_budget():
    pool = StagingPool(10 * KiB)
    held = [pool.take(4 * KiB), pool.take(4 * KiB)]
    got: list[torch.Tensor] = []
    waiter = threading.Thread(target=lambda: got.append(pool.take(4 * KiB)))
    waiter.start()
    time.sleep(0.2)
    assert not got, "a third 4 KiB buffer would exceed the 10 KiB budget"
    freed = held.pop()
    pool.give(freed)
    waiter.join(5)
    assert got and got[0].data_ptr() == freed.data_ptr()  # the freed buffer was reused
    assert pool.peak <= 10 * KiB


def test_a_buffer_is_reused_instead_of_allocated_again():
    pool = StagingPool(64 * KiB)
    first = pool.take(16 * KiB)
    pool.give(first)
    assert pool.take(8 * KiB).data_ptr() == first.data_ptr()
    assert pool.peak == 16 * KiB


def test_one_request_larger_than_the_budget_is_served_alone():
    pool = StagingPool(4 * KiB)
    assert pool.take(16 * KiB).numel() == 16 * KiB


def test_pinned_staging_only_for_cuda_destinations():
    assert not wants_pinned([torch.zeros(3)])
    assert not wants_pinned([])
    # On a machine without CUDA, a CUDA destination cannot exist, and pinning is never asked for.
    assert wants_pinned([torch.zeros(3, device="meta")]) is False


def test_copy_bytes_writes_a_slice_of_any_dtype():
    dest = torch.zeros(4, dtype=torch.float64)
    source = byte_view(torch.tensor([1.5, 2.5], dtype=torch.float64))
    copy_bytes(byte_view(dest), 8, source, 0, 16)
    settle([dest])
    assert dest.tolist() == [0.0, 1.5, 2.5, 0.0]


@pytest.mark.parametrize("budget", [4 * KiB, 1024 * KiB])
def test_live_tensors_are_written_only_on_commit_and_staging_stays_within_budget(budget):
    store = MemoryStorage()
    transfer = TransferConfig(chunk_size=8 * KiB, pack_threshold=2 * KiB, pack_size=2 * KiB, staging_budget=budget)
    saved = [torch.randn(3000), torch.randn(100), torch.randn(5000)]
    write_checkpoint(store, name="a.ckpt", tree={"t": [{"__tensor__": i} for i in range(3)]}, tensors=saved,
                     metadata=dict(step=1, epoch=None, reason="manual", metrics={}, created="2026-01-01T00:00:00Z"),
                     transfer=transfer, known_chunks={})
    live = [torch.zeros(3000), torch.zeros(100), torch.zeros(5000)]
    staged = stage_tensors(store, load_manifest(store, "a.ckpt"), dict(enumerate(live)), transfer)
    assert all(not t.any() for t in live), "a live tensor was written before commit"
    staged.commit()
    assert all(torch.equal(a, b) for a, b in zip(live, saved))
    assert staged.stats.passes == (2 if budget < 32 * KiB else 1)
    assert staged.stats.staging_peak <= max(budget, 8 * KiB)


def test_the_smallest_fitting_buffer_is_reused_whatever_its_contents():
    pool = StagingPool(64 * KiB)
    big, small = pool.take(32 * KiB), pool.take(8 * KiB)
    big.fill_(1)
    small.fill_(2)
    pool.give(big)
    pool.give(small)
    assert pool.take(4 * KiB).data_ptr() == small.data_ptr()
    assert pool.take(4 * KiB).data_ptr() == big.data_ptr()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("budget", [4 * KiB, 1024 * KiB])
def test_cuda_destinations_are_staged_in_pinned_memory_and_written_only_on_commit(budget):
    store = MemoryStorage()
    transfer = TransferConfig(chunk_size=8 * KiB, pack_threshold=2 * KiB, pack_size=2 * KiB, staging_budget=budget)
    saved = [torch.randn(3000), torch.randn(100)]
    write_checkpoint(store, name="a.ckpt", tree={"t": [{"__tensor__": i} for i in range(2)]}, tensors=saved,
                     metadata=dict(step=1, epoch=None, reason="manual", metrics={}, created="2026-01-01T00:00:00Z"),
                     transfer=transfer, known_chunks={})
    live = [torch.zeros(3000, device="cuda"), torch.zeros(100, device="cuda")]
    assert wants_pinned(live)
    staged = stage_tensors(store, load_manifest(store, "a.ckpt"), dict(enumerate(live)), transfer)
    assert staged._pool.pinned and all(not t.any() for t in live)
    staged.commit()
    assert all(torch.equal(a.cpu(), b) for a, b in zip(live, saved))


def _saved_on_disk(tmp_path, transfer):
    store = LocalStorage(tmp_path)
    saved = [torch.randn(3000), torch.randn(100), torch.randn(5000)]
    write_checkpoint(store, name="a.ckpt", tree={"t": [{"__tensor__": i} for i in range(3)]}, tensors=saved,
                     metadata=dict(step=1, epoch=None, reason="manual", metrics={}, created="2026-01-01T00:00:00Z"),
                     transfer=transfer, known_chunks={})
    return store, saved


def test_a_local_root_lends_its_chunk_files_so_nothing_is_staged_or_read_twice(tmp_path):
    transfer = TransferConfig(chunk_size=8 * KiB, pack_threshold=2 * KiB, pack_size=2 * KiB, staging_budget=4 * KiB)
    store, saved = _saved_on_disk(tmp_path, transfer)
    live = [torch.zeros(3000), torch.zeros(100), torch.zeros(5000)]
    staged = stage_tensors(store, load_manifest(store, "a.ckpt"), dict(enumerate(live)), transfer)
    assert all(not t.any() for t in live), "a live tensor was written before commit"
    staged.commit()
    assert all(torch.equal(a, b) for a, b in zip(live, saved))
    assert (staged.stats.passes, staged.stats.staging_peak) == (1, 0)  # below budget, yet one pass, no staging


def test_a_lent_chunk_keeps_the_verified_bytes_when_its_file_is_replaced_or_deleted_before_commit(tmp_path):
    transfer = TransferConfig(chunk_size=8 * KiB, pack_threshold=2 * KiB, pack_size=2 * KiB)
    store, saved = _saved_on_disk(tmp_path, transfer)
    manifest = load_manifest(store, "a.ckpt")
    live = [torch.zeros(3000), torch.zeros(100), torch.zeros(5000)]
    staged = stage_tensors(store, manifest, dict(enumerate(live)), transfer)
    first, *rest = [c.key for c in manifest.chunks]
    store.put(first, b"\xff" * manifest.chunks[0].size)  # what verified must be what is written
    store.delete(rest)
    staged.commit()
    assert all(torch.equal(a, b) for a, b in zip(live, saved))


def test_local_lend_is_a_stable_view_of_the_whole_file(tmp_path):
    store = LocalStorage(tmp_path)
    store.put("a", b"0123456789")
    store.put("empty", b"")
    view = store.lend("a")
    store.put("a", b"changed!!!")
    store.delete(["a"])
    assert bytes(view) == b"0123456789"
    assert bytes(store.lend("empty")) == b""
    with pytest.raises(NotFound):
        store.lend("missing")
    assert MemoryStorage().lend("a") is None  # stores that cannot lend say so; the restore stages instead


def test_the_default_staging_budget_is_a_quarter_of_the_memory_limit_a_container_sets(tmp_path, monkeypatch):
    from cloudckpt import transfer

    limit = tmp_path / "memory.max"
    monkeypatch.setattr(transfer, "_CGROUP_LIMITS", (str(tmp_path / "absent"), str(limit)))
    limit.write_text("4294967296\n")  # a 4 GiB pod on a larger machine
    assert transfer.default_staging_budget() == 1024 * 1024 * KiB
    limit.write_text("max\n")  # no container limit: physical memory decides, within 256 MiB..8 GiB
    assert 256 * 1024 * KiB <= transfer.default_staging_budget() <= 8 * 1024 * 1024 * KiB
    limit.write_text("268435456\n")
    assert TransferConfig().staging_budget == 256 * 1024 * KiB  # the floor


def test_lending_many_chunk_files_holds_no_file_descriptors(tmp_path):
    """A restore holds a view of every chunk until it commits; a descriptor per view would run a
    large checkpoint into the process's open-file limit."""
    import os

    store = LocalStorage(tmp_path)
    for i in range(64):
        store.put(f"chunks/{i:02x}", bytes([i]) * 4096)
    open_before = len(os.listdir("/proc/self/fd"))
    views = [store.lend(f"chunks/{i:02x}") for i in range(64)]
    assert len(os.listdir("/proc/self/fd")) - open_before < 4
    assert all(bytes(v[:1]) == bytes([i]) and len(v) == 4096 for i, v in enumerate(views))
