"""A small training job for the rollback tests, run in a fresh process.

    python train_worker.py ROOT OUT.pt --until N --data a[,b] [--switch-at S] [--endpoint-url URL]

Resumes from ``latest`` under ROOT if there is a checkpoint, trains to step N (batches drawn
from a generator seeded by the data name and the step: "a" up to step S, "b" after it, so a
rollback can train on other data), saves every 5 steps with the training loss as metric, and
writes the final model and optimizer state to OUT.pt.
"""

from __future__ import annotations

import argparse

import torch

import cloudckpt


def batch(data: str, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(step * 1009 + (1 if data == "a" else 2))
    x = torch.randn(16, 8, generator=g)
    return x, x.sum(dim=1, keepdim=True).tanh()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("root")
    parser.add_argument("out")
    parser.add_argument("--until", type=int, required=True)
    parser.add_argument("--data", default="a")
    parser.add_argument("--switch-at", type=int, default=0)
    parser.add_argument("--endpoint-url")
    args = parser.parse_args()
    first, _, second = args.data.partition(",")

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Dropout(0.2), torch.nn.Linear(16, 1))
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.01)
    progress = {"step": 0}
    state = {"model": model, "optimizer": optimizer, "progress": progress}
    options = {"endpoint_url": args.endpoint_url} if args.endpoint_url else None
    mgr = cloudckpt.CheckpointManager(args.root, monitor="loss", storage_options=options,
                                      retention=cloudckpt.KeepLastN(3) | cloudckpt.KeepBestK(1))
    mgr.restore(state)
    while progress["step"] < args.until:
        progress["step"] += 1
        data = second if second and progress["step"] > args.switch_at else first
        x, y = batch(data, progress["step"])
        loss = torch.nn.functional.mse_loss(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if progress["step"] % 5 == 0:
            mgr.save(state, step=progress["step"], metrics={"loss": loss.item()})
    mgr.close()
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict()}, args.out)


if __name__ == "__main__":
    main()
