"""The Lightning job of test_lightning.py, importable and runnable in a fresh process.

    python lightning_job.py first|resume ROOT OUT.pt [ENDPOINT_URL]

``first`` fits toward 4 epochs with a CloudCheckpointCallback on ROOT and is
SIGKILLed by itself as epoch 3 starts (after epoch 2's checkpoint committed);
``resume`` builds a new model and Trainer, resumes with ``ckpt_path="last"``
(the latest checkpoint under ROOT, found through the callback alone) and fits
to 4 epochs.  Both write OUT.pt (``torch.save`` of the
test's own result: parameters, optimizer state, losses, progress).
"""

from __future__ import annotations

import os
import signal
import sys

import lightning as L
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from cloudckpt.integrations.lightning import CloudCheckpointCallback

EPOCHS = 4
KILL_AT_EPOCH = 2  # epochs finished when the first process dies
STEPS_PER_EPOCH = 8


class TinyModule(L.LightningModule):
    """An MLP with dropout, AdamW and an epoch-wise StepLR; records every training loss it computes."""

    def __init__(self, lr: float = 0.02, hidden: int = 16) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(nn.Linear(8, hidden), nn.ReLU(), nn.Dropout(0.3), nn.Linear(hidden, 1))
        self.losses: list[float] = []

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.mse_loss(self.net(x), y)
        self.losses.append(loss.item())
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", nn.functional.mse_loss(self.net(x), y))

    def configure_optimizers(self):
        optimizer = torch.optim.AdamW(self.parameters(), lr=self.hparams.lr)
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.7)
        return {"optimizer": optimizer, "lr_scheduler": scheduler}


def loaders() -> tuple[DataLoader, DataLoader]:
    data = torch.Generator().manual_seed(123)
    x = torch.randn(8 * STEPS_PER_EPOCH, 8, generator=data)
    y = x.sum(1, keepdim=True) + 0.1 * torch.randn(len(x), 1, generator=data)
    train = DataLoader(TensorDataset(x, y), batch_size=8, shuffle=True)  # order drawn from torch's global RNG
    val = DataLoader(TensorDataset(x[:16], y[:16]), batch_size=8)
    return train, val


def make_trainer(callbacks: list, max_epochs: int = EPOCHS, **kwargs) -> L.Trainer:
    return L.Trainer(max_epochs=max_epochs, accelerator="cpu", devices=1, deterministic=True, logger=False,
                     enable_progress_bar=False, enable_model_summary=False, callbacks=callbacks, **kwargs)


def make_callback(root: str, endpoint: str | None) -> CloudCheckpointCallback:
    return CloudCheckpointCallback(root, monitor="val_loss", keep_last_n=2,
                                   storage_options={"endpoint_url": endpoint} if endpoint else None)


def result(model: TinyModule, trainer: L.Trainer) -> dict:
    return {
        "params": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "optimizer": trainer.optimizers[0].state_dict(),
        "lr": trainer.lr_scheduler_configs[0].scheduler.get_last_lr(),
        "losses": list(model.losses),
        "epoch": trainer.current_epoch,
        "global_step": trainer.global_step,
    }


class KillAfter(L.Callback):
    """SIGKILLs the process as epoch ``epochs`` (0-based) starts: like a spot reclaim, no cleanup runs."""

    def __init__(self, epochs: int) -> None:
        self.epochs = epochs

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        if trainer.current_epoch == self.epochs:
            sys.stdout.flush()
            os.kill(os.getpid(), signal.SIGKILL)


def main(argv: list[str]) -> None:
    mode, root, out = argv[:3]
    endpoint = argv[3] if len(argv) > 3 else None
    L.seed_everything(0, workers=True)
    model = TinyModule()
    train, val = loaders()
    callback = make_callback(root, endpoint)
    if mode == "first":
        trainer = make_trainer([callback, KillAfter(KILL_AT_EPOCH)])
        trainer.fit(model, train, val)
        raise SystemExit("the first run was not killed")
    if mode != "resume":
        raise SystemExit(f"unknown mode {mode!r}")
    trainer = make_trainer([callback])
    trainer.fit(model, train, val, ckpt_path="last")  # resolved by the callback to the root's latest checkpoint
    torch.save({**result(model, trainer), "resumed_from": trainer.ckpt_path}, out)


if __name__ == "__main__":
    main(sys.argv[1:])
