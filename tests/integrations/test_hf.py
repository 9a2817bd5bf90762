"""Hugging Face Trainer integration: a tiny GPT-2 built from its config (no hub access) trains on CPU,
crashes after a mid-epoch save, and resumes from S3 (moto) bit-identical to an uninterrupted run."""

from __future__ import annotations

import gc
import os
import tempfile
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from cloudckpt import CheckpointManager, MemoryStorage
from cloudckpt.integrations.hf import CloudCheckpointCallback

STEPS, SAVE_EVERY, CRASH_AT = 12, 3, 6  # 4 steps an epoch: step 6 is in the middle of the second epoch


class _Tokens(torch.utils.data.Dataset):
    def __init__(self) -> None:
        generator = torch.Generator().manual_seed(7)
        self.ids = torch.randint(0, 64, (16, 8), generator=generator)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


class _Crash(transformers.TrainerCallback):
    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step == CRASH_AT:
            raise RuntimeError("simulated crash")


def _model(seed: int):
    transformers.set_seed(seed)
    config = transformers.GPT2Config(vocab_size=64, n_positions=16, n_embd=16, n_layer=2, n_head=2)
    return transformers.GPT2LMHeadModel(config)  # dropout 0.1 everywhere; lm_head tied to wte


def _trainer(model, output_dir, callbacks) -> transformers.Trainer:
    args = transformers.TrainingArguments(
        output_dir=str(output_dir), per_device_train_batch_size=4, max_steps=STEPS, learning_rate=5e-3,
        save_strategy="steps", save_steps=SAVE_EVERY, save_total_limit=1, logging_steps=1, report_to="none",
        use_cpu=True, seed=0, dataloader_num_workers=0, disable_tqdm=True,
    )
    return transformers.Trainer(model=model, args=args, train_dataset=_Tokens(), callbacks=callbacks)


def _losses(trainer) -> dict[int, float]:
    return {e["step"]: e["loss"] for e in trainer.state.log_history if "loss" in e}


def test_crash_and_resume_from_s3_is_bit_identical(moto_s3, tmp_path, monkeypatch):
    straight = _trainer(_model(0), tmp_path / "straight", [CloudCheckpointCallback(MemoryStorage())])
    straight.train()
    assert straight.state.global_step == STEPS

    root = f"s3://{moto_s3.new_bucket()}/hf-run"
    options = {"endpoint_url": moto_s3.endpoint_url}
    first = _trainer(_model(0), tmp_path / "first",
                     [CloudCheckpointCallback(root, keep_last_n=1, storage_options=options), _Crash()])
    with pytest.raises(RuntimeError, match="simulated crash"):
        first.train()
    del first

    with CheckpointManager(root, storage_options=options) as mgr:
        assert [i.name for i in mgr.list()] == [f"checkpoint_step_{CRASH_AT:08d}.ckpt"]  # keep_last_n=1
        assert b"__pickle__" not in mgr.store.get(f"checkpoint_step_{CRASH_AT:08d}.ckpt")

    system_tmp = tmp_path / "system-tmp"
    system_tmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(system_tmp))
    callback = CloudCheckpointCallback(root, keep_last_n=1, storage_options=options)
    resumed = _trainer(_model(1), tmp_path / "resumed", [callback])  # other initial weights: all must be restored
    local = callback.resume_from_checkpoint()
    assert local is not None and local.endswith(f"checkpoint-{CRASH_AT}")
    assert Path(local).parent.parent == system_tmp and (Path(local) / "optimizer.pt").is_file()
    resumed.train(resume_from_checkpoint=local)
    assert list(system_tmp.iterdir()) == [], "the resume folder (a full model + optimizer copy) was left behind"

    assert resumed.state.global_step == STEPS
    ref_losses, got_losses = _losses(straight), _losses(resumed)
    assert {s: got_losses[s] for s in range(CRASH_AT + 1, STEPS + 1)} == \
        {s: ref_losses[s] for s in range(CRASH_AT + 1, STEPS + 1)}
    ref, got = straight.model.state_dict(), resumed.model.state_dict()
    for name, value in ref.items():
        assert torch.equal(got[name], value), f"parameter {name} differs"
    ref_opt, got_opt = straight.optimizer.state_dict(), resumed.optimizer.state_dict()
    for pid, entry in ref_opt["state"].items():
        for key, value in entry.items():
            assert torch.equal(got_opt["state"][pid][key], value), f"optimizer state[{pid}][{key}]"
    assert resumed.lr_scheduler.get_last_lr() == straight.lr_scheduler.get_last_lr()

    with CheckpointManager(root, storage_options=options) as mgr:
        assert [i.name for i in mgr.list()] == [f"checkpoint_step_{STEPS:08d}.ckpt"]


def test_no_checkpoint_means_a_fresh_start(tmp_path):
    assert CloudCheckpointCallback(tmp_path / "empty").resume_from_checkpoint() is None


def test_resume_folders_are_removed_unless_the_caller_chose_the_place(tmp_path, monkeypatch):
    system_tmp = tmp_path / "system-tmp"
    system_tmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(system_tmp))
    manager = CheckpointManager(MemoryStorage(), capture_rng=False)
    manager.save({"model": {"w": torch.ones(2)}, "trainer_state": {"global_step": 3}}, step=3)
    callback = CloudCheckpointCallback(None, manager=manager)
    kept = callback.resume_from_checkpoint(tmp_path / "mine")
    callback.resume_from_checkpoint()
    callback.resume_from_checkpoint()
    assert len(list(system_tmp.iterdir())) == 2
    callback.remove_resume_folders()  # what the first training step (or the end of training) does
    assert list(system_tmp.iterdir()) == [] and (Path(kept) / "model.safetensors").is_file()

    callback.resume_from_checkpoint()  # training never started (it crashed before its first step)
    assert len(list(system_tmp.iterdir())) == 1
    del callback
    gc.collect()
    assert list(system_tmp.iterdir()) == []
