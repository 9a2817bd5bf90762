"""Lightning integration: a real Trainer on CPU, killed after epoch 2, resumed from S3 (moto), bit-identical."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

L = pytest.importorskip("lightning")

import lightning_job as job
from lightning.pytorch.callbacks import ModelCheckpoint

from cloudckpt import AlreadyExists, CheckpointManager, MemoryStorage
from cloudckpt.format.serialize import UnsupportedValue
from cloudckpt.integrations.lightning import (
    LIGHTNING_KEY,
    CloudCheckpointCallback,
    CloudCheckpointIO,
    join_path,
    split_path,
)

WORKER = Path(job.__file__)


@pytest.fixture(autouse=True)
def _keep_torch_determinism_setting():
    """Trainer(deterministic=True) switches torch.use_deterministic_algorithms on for the whole process."""
    before = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    cublas = os.environ.get("CUBLAS_WORKSPACE_CONFIG")
    yield
    torch.use_deterministic_algorithms(before[0], warn_only=before[1])
    if cublas is None:
        os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)
    else:
        os.environ["CUBLAS_WORKSPACE_CONFIG"] = cublas
REPO = Path(__file__).resolve().parents[2]


def _run_worker(mode: str, root: str, out: Path, endpoint: str, cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ)  # carries the AWS_* credentials tests/servers.py set for moto
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return subprocess.run([sys.executable, str(WORKER), mode, root, str(out), endpoint], env=env, cwd=cwd,
                          capture_output=True, text=True, timeout=180, check=False)


def _assert_same(got: dict, ref: dict) -> None:
    for name, value in ref["params"].items():
        assert torch.equal(got["params"][name], value), f"parameter {name} differs"
    assert got["optimizer"]["param_groups"] == ref["optimizer"]["param_groups"]
    for pid, entry in ref["optimizer"]["state"].items():
        for name, value in entry.items():
            assert torch.equal(got["optimizer"]["state"][pid][name], value), f"optimizer state[{pid}][{name}]"
    assert got["lr"] == ref["lr"]


def test_killed_after_epoch_2_resumes_from_s3_bit_identical(moto_s3, tmp_path):
    # The reference: 4 epochs without a stop (checkpointing to memory, so the callbacks are the same).
    L.seed_everything(0, workers=True)
    model = job.TinyModule()
    train, val = job.loaders()
    straight_cb = CloudCheckpointCallback(MemoryStorage(), monitor="val_loss", keep_last_n=2)
    trainer = job.make_trainer([straight_cb])
    trainer.fit(model, train, val)
    ref = job.result(model, trainer)
    assert (ref["epoch"], ref["global_step"]) == (job.EPOCHS, job.EPOCHS * job.STEPS_PER_EPOCH)
    # ckpt_path="best" goes through the callback's best_model_path and the plugin it installed.
    assert straight_cb.best_model_path.startswith("memory://checkpoint_epoch_")
    trainer.validate(model, val, ckpt_path="best", verbose=False)

    root = f"s3://{moto_s3.new_bucket()}/lightning-run"
    first = _run_worker("first", root, tmp_path / "unused.pt", moto_s3.endpoint_url, tmp_path)
    assert first.returncode == -signal.SIGKILL, f"first run was not killed:\n{first.stdout}\n{first.stderr}"

    options = {"endpoint_url": moto_s3.endpoint_url}
    with CheckpointManager(root, storage_options=options, monitor="val_loss") as mgr:
        infos = mgr.list()
        assert [i.name for i in infos] == ["checkpoint_epoch_0001.ckpt", "checkpoint_epoch_0002.ckpt"]
        assert "latest.ckpt" in infos[-1].pointers
        assert infos[-1].step == 2 * job.STEPS_PER_EPOCH and infos[-1].epoch == 2
        assert set(infos[-1].metrics) >= {"val_loss", "train_loss"}
        assert b"__pickle__" not in mgr.store.get("checkpoint_epoch_0002.ckpt")  # no pickle anywhere
        state, _ = mgr.load("latest")
        saved = state[LIGHTNING_KEY]
        assert {"state_dict", "optimizer_states", "lr_schedulers", "loops", "callbacks", "epoch", "global_step",
                "hyper_parameters"} <= set(saved)
        assert saved["hyper_parameters"] == {"lr": 0.02, "hidden": 16}

    out = tmp_path / "resumed.pt"
    resumed = _run_worker("resume", root, out, moto_s3.endpoint_url, tmp_path)
    assert resumed.returncode == 0, f"resume failed:\n{resumed.stdout}\n{resumed.stderr}"
    got = torch.load(out, weights_only=True)
    assert got["resumed_from"] == f"{root}/checkpoint_epoch_0002.ckpt"
    assert (got["epoch"], got["global_step"]) == (ref["epoch"], ref["global_step"])
    assert got["losses"] == ref["losses"][2 * job.STEPS_PER_EPOCH:], "losses after the resume differ"
    _assert_same(got, ref)

    with CheckpointManager(root, storage_options=options, monitor="val_loss") as mgr:
        names = {i.name for i in mgr.list()}
        best = mgr.best()
        assert best is not None
        # keep_last_n=2 plus the best one; the end-of-training save was skipped (epoch 4's step is saved).
        assert names == {"checkpoint_epoch_0003.ckpt", "checkpoint_epoch_0004.ckpt", best.name}


def test_plugin_with_a_local_model_checkpoint(tmp_path):
    """ModelCheckpoint on a local dirpath writes cloudckpt checkpoints through the plugin; top-k removal and
    ckpt_path=<dir>/latest.ckpt work; save_last=True, which rewrites last.ckpt, is refused, deleting nothing."""
    dirpath = tmp_path / "ckpts"
    L.seed_everything(0)
    model = job.TinyModule()
    train, val = job.loaders()
    checkpoint = ModelCheckpoint(dirpath=dirpath, monitor="val_loss", save_top_k=1)
    trainer = job.make_trainer([checkpoint], max_epochs=2, plugins=[CloudCheckpointIO()])
    trainer.fit(model, train, val)
    files = sorted(p.name for p in dirpath.iterdir() if p.is_file())
    # one top-1 checkpoint (the other was removed by ModelCheckpoint) and the latest pointer
    assert files == ["epoch=1-step=16.ckpt", "latest.ckpt"]
    assert checkpoint.best_model_path == str(dirpath / "epoch=1-step=16.ckpt")  # epoch=0 was removed

    rewriting = tmp_path / "rewriting"
    save_last = ModelCheckpoint(dirpath=rewriting, monitor="val_loss", save_top_k=1, save_last=True)
    trainer = job.make_trainer([save_last], max_epochs=2, plugins=[CloudCheckpointIO()])
    with pytest.raises(AlreadyExists, match=r"never replaced.*save_last=False.*latest\.ckpt"):
        trainer.fit(job.TinyModule(), train, val)
    with CheckpointManager(rewriting) as mgr:
        assert mgr.manifest("last.ckpt").step == job.STEPS_PER_EPOCH  # epoch 1's, untouched

    model2 = job.TinyModule()
    trainer2 = job.make_trainer([], max_epochs=3, plugins=[CloudCheckpointIO()], enable_checkpointing=False)
    trainer2.fit(model2, train, val, ckpt_path=str(dirpath / "latest.ckpt"))
    assert trainer2.global_step == 3 * job.STEPS_PER_EPOCH


def test_save_checkpoint_to_s3_and_load(moto_s3):
    """trainer.save_checkpoint("s3://...") through the plugin, loaded back by a fresh plugin; the same name twice
    is refused and the first checkpoint stays."""
    options = {"endpoint_url": moto_s3.endpoint_url}
    path = f"s3://{moto_s3.new_bucket()}/manual/weights.ckpt"
    L.seed_everything(0)
    model = job.TinyModule()
    train, _ = job.loaders()
    io = CloudCheckpointIO(storage_options=options)
    trainer = job.make_trainer([], max_epochs=1, plugins=[io], enable_checkpointing=False, limit_train_batches=3)
    trainer.fit(model, train)
    trainer.save_checkpoint(path, storage_options={"metrics": {"score": 1.5}})
    with pytest.raises(AlreadyExists, match="never replaced"):
        trainer.save_checkpoint(path)
    loaded = CloudCheckpointIO(storage_options=options).load_checkpoint(path)
    assert loaded["global_step"] == 3
    for name, value in model.state_dict().items():
        assert torch.equal(loaded["state_dict"][name], value)
    root, name = split_path(path)
    assert join_path(root, name) == path
    with CheckpointManager(root, storage_options=options) as mgr:
        assert [(i.name, i.metrics) for i in mgr.list()] == [("weights.ckpt", {"score": 1.5})]
    io.remove_checkpoint(path)
    with CheckpointManager(root, storage_options=options) as mgr:
        assert mgr.list() == []


def test_values_that_need_pickle_are_refused_unless_allowed(tmp_path):
    checkpoint = {"epoch": 0, "global_step": 3, "state_dict": {"w": torch.ones(2)},
                  "hyper_parameters": {"activation": torch.nn.Tanh}}
    path = str(tmp_path / "run" / "odd.ckpt")
    with pytest.raises(UnsupportedValue, match=r'\["hyper_parameters"\]\["activation"\].*allow_pickle=True'):
        CloudCheckpointIO().save_checkpoint(checkpoint, path)
    CloudCheckpointIO(allow_pickle=True).save_checkpoint(checkpoint, path)
    with pytest.raises(Exception, match="pickled value"):
        CloudCheckpointIO().load_checkpoint(path)
    assert CloudCheckpointIO(allow_pickle=True).load_checkpoint(path)["hyper_parameters"]["activation"] is torch.nn.Tanh


def test_missing_checkpoint_is_a_clear_error(tmp_path):
    from cloudckpt import NotFound

    with pytest.raises(NotFound, match="no checkpoint"):
        CloudCheckpointIO().load_checkpoint(str(tmp_path / "latest.ckpt"))
    with pytest.raises(NotFound, match="nope.ckpt"):
        CloudCheckpointIO().load_checkpoint(str(tmp_path / "nope.ckpt"))
    assert CloudCheckpointCallback(tmp_path / "empty").latest_path() is None


def test_model_checkpoint_on_s3_needs_s3fs():
    """What ModelCheckpoint(dirpath="s3://...") really does: fsspec needs s3fs, at construction.
    (Hence CloudCheckpointCallback for cloud roots.)"""
    pytest.importorskip("fsspec")
    try:
        import s3fs  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("s3fs is installed: fsspec can open s3:// here")
    with pytest.raises(ImportError, match="s3fs"):
        ModelCheckpoint(dirpath="s3://bucket/run")
