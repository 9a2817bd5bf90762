"""restore() options: keys=[...] (partial), which=<name|step>, map_location, and the empty/missing cases."""

from __future__ import annotations

import pytest
import torch
from ckpt_util import assert_same_tree, params_of

from cloudckpt import CheckpointManager, MemoryStorage, NotFound, TransferConfig
from cloudckpt.restore import StateMismatch
from cloudckpt.storage.faults import FaultyStorage

KiB = 1024
TRANSFER = TransferConfig(chunk_size=64 * KiB, pack_threshold=1 * KiB)


def _job(seed: int):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.Tanh(), torch.nn.Linear(64, 8))
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    model(torch.randn(5, 32)).pow(2).sum().backward()
    opt.step()
    return model, opt


def _opt_tensors(opt) -> dict[str, torch.Tensor]:
    return {f"{pid}.{k}": v.clone() for pid, s in opt.state_dict()["state"].items() for k, v in s.items()}


def test_partial_restore_touches_only_the_named_key():
    store = FaultyStorage(MemoryStorage())
    model, opt = _job(0)
    saved_model = params_of(model)
    mgr = CheckpointManager(store, transfer=TRANSFER)
    mgr.save({"model": model, "opt": opt, "progress": {"step": 10}, "ema": torch.ones(300)}, step=10)
    model_chunks = {c.key for t_index in _model_tensor_indices(mgr) for c in _chunks_of(mgr, t_index)}

    model2, opt2 = _job(1)
    opt_before = _opt_tensors(opt2)
    state = {"model": model2, "opt": opt2, "progress": {"step": 3}, "ema": torch.zeros(300)}
    torch.manual_seed(4242)
    rng_before = torch.get_rng_state()
    calls_before = len(store.calls)
    info = CheckpointManager(store, transfer=TRANSFER).restore(state, keys=["model"])
    assert info.step == 10
    assert_same_tree(params_of(model2), saved_model)
    assert_same_tree(_opt_tensors(opt2), opt_before)
    assert state["progress"] == {"step": 3} and torch.equal(state["ema"], torch.zeros(300))
    assert torch.equal(torch.get_rng_state(), rng_before), "a partial restore must not restore RNG state"
    read = {key for verb, key in store.calls[calls_before:] if verb == "get" and key.startswith("chunks/")}
    assert read and read <= model_chunks, "chunks of other entries were downloaded"

    # control: a full restore does bring back everything, RNG included
    CheckpointManager(store, transfer=TRANSFER).restore(state)
    assert state["progress"] == {"step": 10} and torch.equal(state["ema"], torch.ones(300))
    assert not torch.equal(torch.get_rng_state(), rng_before)


def _model_tensor_indices(mgr: CheckpointManager) -> list[int]:
    tree = mgr.manifest(mgr.latest().name).state["model"]["__state_dict__"]
    return [node["__tensor__"] for node in tree.values()]


def _chunks_of(mgr: CheckpointManager, index: int):
    manifest = mgr.manifest(mgr.latest().name)
    return [manifest.chunks[s.chunk_index] for s in manifest.tensors[index].segments]


def test_partial_restore_refuses_unknown_keys():
    mgr = CheckpointManager("memory://")
    model, _ = _job(0)
    mgr.save({"model": model}, step=1)
    with pytest.raises(StateMismatch):
        mgr.restore({"model": model}, keys=["optimizer"])  # not in the state passed in
    with pytest.raises(StateMismatch):
        mgr.restore({"model": model, "opt": {}}, keys=["opt"])  # not in the checkpoint


def test_which_accepts_a_step_number_and_a_name():
    mgr = CheckpointManager("memory://", capture_rng=False)
    for step in (1, 2, 3):
        mgr.save({"w": torch.full((3,), float(step))}, step=step)
    state = {"w": torch.zeros(3)}
    assert mgr.restore(state, which=2).step == 2 and torch.equal(state["w"], torch.full((3,), 2.0))
    assert mgr.restore(state, which="checkpoint_step_00000001.ckpt").step == 1
    assert torch.equal(state["w"], torch.ones(3))
    assert mgr.restore(state).step == 3 and torch.equal(state["w"], torch.full((3,), 3.0))
    assert mgr.load(2)[0]["w"][0].item() == 2.0


def test_restore_a_missing_name_raises_not_found():
    mgr = CheckpointManager("memory://")
    mgr.save({"w": torch.ones(2)}, step=1)
    with pytest.raises(NotFound) as excinfo:
        mgr.restore({"w": torch.zeros(2)}, which="checkpoint_step_00000099.ckpt")
    assert "checkpoint_step_00000099.ckpt" in str(excinfo.value)
    with pytest.raises(NotFound):
        mgr.load("checkpoint_step_00000099.ckpt")


def test_restore_a_missing_step_raises_not_found():
    mgr = CheckpointManager("memory://")
    mgr.save({"w": torch.ones(2)}, step=1)
    with pytest.raises(NotFound):
        mgr.restore({"w": torch.zeros(2)}, which=99)


def test_empty_root_restores_nothing(tmp_path):
    for root in ("memory://", tmp_path / "empty"):
        mgr = CheckpointManager(root)
        state = {"w": torch.ones(2)}
        assert mgr.restore(state) is None
        assert torch.equal(state["w"], torch.ones(2))
        assert mgr.latest() is None and mgr.list() == []
        with pytest.raises(NotFound):
            mgr.load()
        with pytest.raises(NotFound):
            mgr.verify()


def test_map_location_cpu():
    mgr = CheckpointManager("memory://", capture_rng=False)
    model, opt = _job(0)
    saved = params_of(model)
    mgr.save({"model": model, "opt": opt, "t": torch.arange(6).reshape(2, 3)}, step=1)
    model2, opt2 = _job(1)
    state = {"model": model2, "opt": opt2, "t": torch.zeros(2, 3, dtype=torch.int64)}
    ptr = next(model2.parameters()).data_ptr()
    assert mgr.restore(state, map_location="cpu").step == 1
    assert_same_tree(params_of(model2), saved)
    assert next(model2.parameters()).data_ptr() == ptr
    assert torch.equal(state["t"], torch.arange(6).reshape(2, 3))
    assert_same_tree(_opt_tensors(opt2), _opt_tensors(opt))
    loaded, _ = mgr.load(map_location=torch.device("cpu"))
    assert all(v.device.type == "cpu" for v in loaded["model"].values())
