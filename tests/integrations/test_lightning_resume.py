"""Lightning with CloudCheckpointCallback alone, as a user writes it: ckpt_path="last"/"best" resume the root's
run, nothing committed is ever deleted or replaced, a checkpoint's metrics are its own weights', and a run forks
from another run's checkpoint on S3 (moto) without s3fs."""

from __future__ import annotations

import os

import pytest
import torch

L = pytest.importorskip("lightning")

import lightning_job as job
from torch.utils.data import DataLoader, TensorDataset

from cloudckpt import AlreadyExists, CheckpointManager
from cloudckpt.integrations.lightning import LIGHTNING_KEY, CloudCheckpointCallback

STEPS = job.STEPS_PER_EPOCH


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


def _fit(root, max_epochs: int, ckpt_path=None, seed: int = 0, **callback_options):
    L.seed_everything(seed, workers=True)
    model = job.TinyModule()
    train, val = job.loaders()
    callback = CloudCheckpointCallback(root, monitor="val_loss", **callback_options)
    trainer = job.make_trainer([callback], max_epochs=max_epochs)
    trainer.fit(model, train, val, ckpt_path=ckpt_path)
    return trainer, callback


def _manifests(root) -> dict[str, bytes]:
    with CheckpointManager(root) as mgr:
        return {info.name: mgr.store.get(info.name) for info in mgr.list()}


def test_last_and_best_resolve_through_the_callback_and_nothing_is_replaced(tmp_path):
    root = tmp_path / "run"
    trainer, _ = _fit(root, max_epochs=2)  # the run a spot reclaim stopped after epoch 2
    before = _manifests(root)
    assert sorted(before) == ["checkpoint_epoch_0001.ckpt", "checkpoint_epoch_0002.ckpt"]

    trainer, callback = _fit(root, max_epochs=3, ckpt_path="last")
    assert trainer.ckpt_path == str(root / "checkpoint_epoch_0002.ckpt")
    assert trainer.global_step == 3 * STEPS  # trained epoch 3 only
    after = _manifests(root)
    assert {name: after[name] for name in before} == before  # the killed run's checkpoints, byte for byte
    assert sorted(after) == [*sorted(before), "checkpoint_epoch_0003.ckpt"]

    best = callback.manager.best()
    trainer, _ = _fit(root, max_epochs=4, ckpt_path="best")
    assert trainer.ckpt_path == str(root / best.name)
    assert trainer.global_step == best.step + (4 - best.epoch) * STEPS


def test_last_on_an_empty_root_is_a_fresh_start(tmp_path):
    with pytest.warns(UserWarning, match="no last checkpoint"):
        trainer, _ = _fit(tmp_path / "new", max_epochs=1, ckpt_path="last")
    assert trainer.ckpt_path is None and trainer.global_step == STEPS


def test_a_fresh_start_on_a_used_root_is_refused_and_deletes_nothing(tmp_path):
    root = tmp_path / "run"
    _fit(root, max_epochs=1)
    before = _manifests(root)
    _fit(root, max_epochs=1)  # the same run again, bit for bit: its checkpoints are already saved (a no-op)
    assert _manifests(root) == before
    with pytest.raises(AlreadyExists, match=r'checkpoint_epoch_0001\.ckpt is already committed.*ckpt_path="last"'):
        _fit(root, max_epochs=1, seed=1)  # forgot ckpt_path: trains other weights and reaches an existing name
    assert _manifests(root) == before


def _sixteen_batches() -> tuple[DataLoader, DataLoader]:
    data = torch.Generator().manual_seed(5)
    x = torch.randn(16 * 8, 8, generator=data)
    y = x.sum(1, keepdim=True)
    return (DataLoader(TensorDataset(x, y), batch_size=8, shuffle=True),
            DataLoader(TensorDataset(x[:32], y[:32]), batch_size=8))


def _val_loss_of(state_dict: dict, val: DataLoader) -> float:
    model = job.TinyModule()
    model.load_state_dict(state_dict)
    model.eval()
    with torch.no_grad():
        losses = [torch.nn.functional.mse_loss(model.net(x), y) for x, y in val]
    return float(torch.stack(losses).mean())


def test_step_saves_that_end_an_epoch_leave_the_metrics_to_the_epoch_save(tmp_path):
    """16 batches an epoch, every_n_train_steps=16: the step save comes before validation, so it must not
    carry the previous epoch's val_loss; the epoch save after validation carries this epoch's and is the best."""
    L.seed_everything(0, workers=True)
    train, val = _sixteen_batches()
    callback = CloudCheckpointCallback(tmp_path / "run", monitor="val_loss", every_n_train_steps=16)
    trainer = job.make_trainer([callback], max_epochs=2)
    trainer.fit(job.TinyModule(), train, val)

    with CheckpointManager(tmp_path / "run", monitor="val_loss") as mgr:
        infos = {i.name: i for i in mgr.list()}
        assert sorted(infos) == ["checkpoint_epoch_0001.ckpt", "checkpoint_epoch_0002.ckpt",
                                 "checkpoint_step_00000016.ckpt", "checkpoint_step_00000032.ckpt"]
        for name, info in infos.items():
            weights = mgr.load(name)[0][LIGHTNING_KEY]["state_dict"]
            if name.startswith("checkpoint_step_"):
                assert "val_loss" not in info.metrics, f"{name} carries a val_loss of other weights"
                assert "train_loss" in info.metrics
            else:
                assert info.metrics["val_loss"] == pytest.approx(_val_loss_of(weights, val), rel=1e-5), name
        assert infos["checkpoint_epoch_0002.ckpt"].step == infos["checkpoint_step_00000032.ckpt"].step == 32
        assert mgr.best().name.startswith("checkpoint_epoch_")


@pytest.mark.parametrize("scheme", ["s3", "gs"])
def test_fork_from_another_runs_best_checkpoint_in_the_cloud(scheme, request):
    """ckpt_path names a checkpoint of another root: read with the callback's storage options, no s3fs/gcsfs."""
    server = request.getfixturevalue("moto_s3" if scheme == "s3" else "fake_gcs")
    if scheme == "gs":
        from gcs_helpers import drain_server_log

        drain_server_log(server)
    options = {"endpoint_url": server.endpoint_url}
    bucket = server.new_bucket()
    parent, child = f"{scheme}://{bucket}/parent-run", f"{scheme}://{bucket}/child-run"
    _fit(parent, max_epochs=2, storage_options=options)
    parent_before = _manifests_s3(parent, options)

    trainer, callback = _fit(child, max_epochs=3, ckpt_path=f"{parent}/best_model_val_loss.ckpt",
                             storage_options=options)
    with CheckpointManager(parent, storage_options=options, monitor="val_loss") as mgr:
        best = mgr.best()
    assert trainer.global_step == best.step + (3 - best.epoch) * STEPS
    assert [i.name for i in callback.manager.list()] == [
        f"checkpoint_epoch_{e:04d}.ckpt" for e in range(best.epoch + 1, 4)]
    assert _manifests_s3(parent, options) == parent_before


def _manifests_s3(root: str, options: dict) -> dict[str, bytes]:
    with CheckpointManager(root, storage_options=options) as mgr:
        return {info.name: mgr.store.get(info.name) for info in mgr.list()}
