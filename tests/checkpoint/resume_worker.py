"""The training job of the exact-resume test (test_exact_resume.py), importable and runnable.

    python resume_worker.py ROOT OUT.pt N [ENDPOINT_URL]

runs in a fresh process: it builds the job, restores the latest checkpoint
under ROOT (a path or s3://bucket/prefix, with ENDPOINT_URL for a test S3),
trains until step N and writes final parameters, optimizer state and the
losses it computed to OUT.pt (``torch.save``: the test's own result file).
"""

from __future__ import annotations

import random
import sys

import numpy as np
import torch

import cloudckpt

BATCH_SIZE = 4
DATASET_SIZE = 36  # 9 batches an epoch: step 10 is in the middle of epoch 1


class Job:
    """Model with dropout, AdamW, a StepLR schedule and a shuffling, resumable data order."""

    def __init__(self, seed: int = 0, loader_generator: bool = True) -> None:
        torch.manual_seed(seed)
        random.seed(seed)
        np.random.seed(seed)
        data = torch.Generator().manual_seed(1000)
        x = torch.randn(DATASET_SIZE, 8, generator=data)
        y = (x @ torch.randn(8, 1, generator=data)).tanh()
        self.dataset = torch.utils.data.TensorDataset(x, y)
        self.sampler = cloudckpt.ResumableSampler(self.dataset, shuffle=True, seed=7)
        # The DataLoader draws a base seed from the *global* torch generator at every iter();
        # its own generator keeps that draw out of the RNG stream cloudckpt restores.
        self.loader = torch.utils.data.DataLoader(
            self.dataset, batch_size=BATCH_SIZE, sampler=self.sampler,
            generator=torch.Generator() if loader_generator else None)
        self.model = torch.nn.Sequential(
            torch.nn.Linear(8, 32), torch.nn.ReLU(), torch.nn.Dropout(0.3), torch.nn.Linear(32, 1))
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=0.02, weight_decay=0.01)
        self.sched = torch.optim.lr_scheduler.StepLR(self.opt, step_size=4, gamma=0.7)
        self.progress = {"step": 0, "epoch_losses": []}
        self.losses: list[float] = []

    def state(self) -> dict:
        return {"model": self.model, "optimizer": self.opt, "scheduler": self.sched,
                "sampler": self.sampler, "progress": self.progress}

    def train(self, until: int) -> None:
        """Train until ``progress["step"] == until``; may stop in the middle of an epoch."""
        self.model.train()
        while self.progress["step"] < until:
            for x, y in self.loader:
                x = x + 0.05 * torch.randn_like(x)                    # torch global RNG
                scale = 1.0 + 0.1 * random.random() + 0.1 * np.random.rand()  # python + numpy RNG
                loss = torch.nn.functional.mse_loss(self.model(x), y) * scale
                self.opt.zero_grad()
                loss.backward()
                self.opt.step()
                self.sched.step()
                self.progress["step"] += 1
                self.losses.append(loss.item())
                if self.progress["step"] >= until:
                    return

    def result(self) -> dict:
        return {"params": {k: v.detach().clone() for k, v in self.model.state_dict().items()},
                "optimizer": self.opt.state_dict(), "losses": list(self.losses),
                "step": self.progress["step"], "lr": self.sched.get_last_lr()}


def main(argv: list[str]) -> int:
    root, out, until = argv[0], argv[1], int(argv[2])
    options = {"endpoint_url": argv[3]} if len(argv) > 3 else None
    job = Job(seed=12345)  # a different init and RNG: everything must come from the checkpoint
    with cloudckpt.CheckpointManager(root, storage_options=options) as mgr:
        info = mgr.restore(job.state())
    if info is None:
        print("no checkpoint to resume from", file=sys.stderr)
        return 2
    job.train(until)
    result = job.result()
    result["resumed_from"] = info.step
    torch.save(result, out)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
