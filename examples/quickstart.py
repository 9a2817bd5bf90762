"""Quick start: train a small model with CheckpointCallback, then resume and restore the best weights.

    python examples/quickstart.py [ROOT]     # ROOT: a directory, file://, s3:// or gs:// URL

Run it twice: the second run resumes from the newest checkpoint and trains no further
than the requested epochs.
"""

from __future__ import annotations

import argparse
import logging

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import cloudckpt


def make_data(seed: int = 0) -> tuple[TensorDataset, TensorDataset]:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(512, 16, generator=generator)
    y = (x @ torch.randn(16, 1, generator=generator)) + 0.1 * torch.randn(512, 1, generator=generator)
    return TensorDataset(x[:448], y[:448]), TensorDataset(x[448:], y[448:])


def mse(model: nn.Module, batch) -> torch.Tensor:
    inputs, targets = batch
    return nn.functional.mse_loss(model(inputs), targets)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root", nargs="?", default="ckpts/quickstart")
    parser.add_argument("--epochs", type=int, default=5)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")

    torch.manual_seed(0)
    train, val = make_data()
    loader = DataLoader(train, batch_size=32, sampler=cloudckpt.ResumableSampler(train, seed=0))
    model = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Dropout(0.1), nn.Linear(64, 1))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=args.epochs * len(loader))

    callback = cloudckpt.CheckpointCallback(
        args.root, save_frequency=1, save_best=True, monitor="val_loss", mode="min",
        keep_last_n=2, async_save=True,
    )
    trainer = cloudckpt.Trainer(
        model, optimizer, loader, mse, val_loader=DataLoader(val, batch_size=64),
        scheduler=scheduler, callbacks=[callback], max_epochs=args.epochs,
    )
    trainer.fit()

    print(f"\ncheckpoints under {callback.manager.store.url}:")
    for info in callback.manager.list():
        pointers = ", ".join(info.pointers) or "-"
        print(f"  {info.name:34s} step {info.step:5d}  val_loss {info.metrics.get('val_loss', float('nan')):.4f}"
              f"  [{pointers}]")

    fresh = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Dropout(0.1), nn.Linear(64, 1))
    best = callback.manager.restore({"model": fresh}, which="best", keys=["model"])
    fresh.eval()
    with torch.no_grad():
        loss = sum(mse(fresh, b).item() for b in DataLoader(val, batch_size=64))
    print(f"restored {best.name} into a fresh model: val_loss {loss:.4f}")
    callback.manager.close()


if __name__ == "__main__":
    main()
