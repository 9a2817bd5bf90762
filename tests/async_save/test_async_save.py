"""Async saves: only the host copy blocks; errors surface later; exits complete or leave nothing."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import threading

import pytest
import torch

import cloudckpt
from cloudckpt.errors import PermissionDenied
from cloudckpt.pipeline import SaveHandle
from cloudckpt.storage import MemoryStorage
from cloudckpt.storage.faults import Fault, FaultyStorage


class GatedStorage(FaultyStorage):
    """Holds every manifest write until ``gate`` is set, to keep a save in flight on purpose."""

    def __init__(self, inner):
        super().__init__(inner)
        self.gate = threading.Event()
        self.waiting = threading.Event()

    def put(self, key, data, mode="overwrite"):
        if key.endswith(".ckpt") and mode == "create":
            self.waiting.set()
            assert self.gate.wait(30), "test never opened the gate"
        return super().put(key, data, mode)


def _model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.Linear(64, 8))


def test_save_returns_a_handle_and_the_snapshot_is_isolated_from_later_updates():
    store = GatedStorage(MemoryStorage())
    mgr = cloudckpt.CheckpointManager(store, async_save=True, capture_rng=False)
    model = _model()
    expected = {k: v.clone() for k, v in model.state_dict().items()}
    handle = mgr.save({"model": model}, step=1)
    assert isinstance(handle, SaveHandle) and not handle.done()
    with torch.no_grad():  # training goes on while the upload is still in flight
        for p in model.parameters():
            p.add_(1.0)
    store.gate.set()
    info = handle.result(timeout=30)
    assert info.name == "checkpoint_step_00000001.ckpt"
    fresh = _model(seed=1)
    mgr.restore({"model": fresh})
    for key, value in fresh.state_dict().items():
        assert torch.equal(value, expected[key])
    mgr.close()


def test_next_save_waits_for_the_one_in_flight():
    store = GatedStorage(MemoryStorage())
    mgr = cloudckpt.CheckpointManager(store, async_save=True, capture_rng=False)
    model = _model()
    mgr.save({"model": model}, step=1)
    assert store.waiting.wait(30)
    second_returned = threading.Event()
    thread = threading.Thread(target=lambda: (mgr.save({"model": model}, step=2), second_returned.set()))
    thread.start()
    assert not second_returned.wait(0.2), "a second save started while the first was in flight"
    store.gate.set()
    thread.join(30)
    assert second_returned.is_set()
    mgr.wait()
    assert [i.step for i in mgr.list()] == [1, 2]
    mgr.close()


@pytest.mark.parametrize("surface", ["save", "wait", "close"])
def test_a_background_failure_surfaces_on_the_next_call(surface):
    store = FaultyStorage(MemoryStorage(), [Fault("put", key_prefix="checkpoint_step_00000001", kind="permanent")])
    mgr = cloudckpt.CheckpointManager(store, async_save=True, capture_rng=False)
    model = _model()
    handle = mgr.save({"model": model}, step=1)
    with pytest.raises(PermissionDenied):
        handle.result(timeout=30)
    with pytest.raises(PermissionDenied):
        if surface == "save":
            mgr.save({"model": model}, step=2)
        elif surface == "wait":
            mgr.wait()
        else:
            mgr.close()
    if surface != "close":  # reported once; the manager keeps working
        mgr.save({"model": model}, step=3)
        mgr.wait()
        assert [i.step for i in mgr.list()] == [3]
        mgr.close()
    assert store.inner.list("checkpoint_step_00000001") == []


_EXIT_SCRIPT = textwrap.dedent("""
    import os, sys, time, torch, cloudckpt
    from cloudckpt.storage.local import LocalStorage

    class Slow(LocalStorage):
        def put(self, key, data, mode="overwrite"):
            time.sleep(0.05)  # a slow link: the save is surely still in flight at exit
            return super().put(key, data, mode)

    root, how = sys.argv[1], sys.argv[2]
    mgr = cloudckpt.CheckpointManager(Slow(root), async_save=True,
                                      transfer=cloudckpt.TransferConfig(chunk_size=1 << 16, pack_threshold=1 << 14))
    model = torch.nn.Sequential(*[torch.nn.Linear(128, 128) for _ in range(8)])
    mgr.save({"model": model}, step=7)
    print("saved", flush=True)
    if how == "hard":
        os._exit(0)
    # "normal": fall off the end of the script without wait() or close()
""")


@pytest.mark.parametrize("how", ["normal", "hard"])
def test_interpreter_exit_completes_or_leaves_nothing_visible(tmp_path, how):
    root = tmp_path / "root"
    done = subprocess.run([sys.executable, "-c", _EXIT_SCRIPT, str(root), how], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    manifests = sorted(p.name for p in root.glob("checkpoint_*.ckpt"))
    if how == "normal":
        assert manifests == ["checkpoint_step_00000007.ckpt"]
        mgr = cloudckpt.CheckpointManager(root)
        mgr.verify()
        assert mgr.latest().step == 7
    else:
        assert manifests == []
        assert cloudckpt.CheckpointManager(root).restore({"model": torch.nn.Linear(1, 1)}) is None


def test_sync_and_async_write_the_same_checkpoint_bytes():
    model = _model()
    stores = []
    for async_save in (False, True):
        store = MemoryStorage()
        mgr = cloudckpt.CheckpointManager(store, async_save=async_save, capture_rng=False)
        mgr.save({"model": model}, step=1)
        mgr.close()
        stores.append(sorted(i.key for i in store.list("chunks/")))
    assert stores[0] == stores[1]
