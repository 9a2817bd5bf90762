"""The state every case saves: a stack of Linear layers and its AdamW state after real steps.

``train_step`` runs a real forward, backward and optimizer step, so every
parameter that trains and every Adam moment of it changes, as in training.
``freeze_backbone`` turns the same model into a fine-tuning job (frozen
backbone, trained head), the case content-addressed dedup is built for.
"""

from __future__ import annotations

import torch
from torch import nn

MiB = 1024 * 1024


class Workload:
    """A model + AdamW pair of about ``size_mib`` MiB (fp32 parameters and two moments)."""

    def __init__(self, size_mib: float, *, seed: int = 0, finetune: bool = False) -> None:
        torch.manual_seed(seed)
        self.dim = 1024 if size_mib >= 192 else 512 if size_mib >= 24 else 128
        per_layer = 3 * 4 * (self.dim * self.dim + self.dim)  # params + 2 moments, fp32
        layers = max(2, round(size_mib * MiB / per_layer))
        self.model = nn.Sequential(*[nn.Linear(self.dim, self.dim) for _ in range(layers)])
        if finetune:
            for layer in self.model[:-1]:
                layer.requires_grad_(False)
        trained = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(trained, lr=1e-4)
        self.batch = torch.randn(4, self.dim)
        self.step()

    @property
    def state(self) -> dict[str, object]:
        """What cloudckpt saves: the live objects."""
        return {"model": self.model, "optimizer": self.optimizer}

    def state_dict(self) -> dict[str, object]:
        """What torch.save and DCP save: plain state dicts."""
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, loaded: dict[str, object]) -> None:
        self.model.load_state_dict(loaded["model"])
        self.optimizer.load_state_dict(loaded["optimizer"])

    def tensors(self) -> list[torch.Tensor]:
        found = list(self.model.state_dict().values())
        for per_param in self.optimizer.state.values():
            found += [v for v in per_param.values() if isinstance(v, torch.Tensor)]
        return found

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors())

    def step(self) -> None:
        """One real training step: every trained parameter and each of its Adam moments changes."""
        loss = self.model(self.batch).square().mean()
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
