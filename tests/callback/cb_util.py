"""Helpers of the callback / retention suite: a tiny scripted training run and storage inspection.

The model is a 4->1 linear layer on a fixed list of batches (no randomness in
the loop).  Validation does not look at the model: the val loss of epoch ``e``
(1-based) is ``val_script[e - 1]``, so a test decides exactly which epoch is
the best.  No fixtures here (see conftest.py).
"""

from __future__ import annotations

import datetime as dt
import json
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from servers import make_store  # noqa: F401  (re-exported for the tests)

from cloudckpt import CheckpointInfo, CheckpointManager, Trainer
from cloudckpt.callback import Callback
from cloudckpt.pointers import LATEST_POINTER, STATE_KEY, best_pointer_key, read_pointer
from cloudckpt.storage import Storage
from cloudckpt.storage.lifecycle import CHUNK_PREFIX

T0 = dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)
BEST = best_pointer_key("val_loss")


def epoch_name(epoch: int) -> str:
    return f"checkpoint_epoch_{epoch:04d}.ckpt"


def step_name(step: int) -> str:
    return f"checkpoint_step_{step:08d}.ckpt"


def info(name: str, step: int, *, epoch: int | None = None, metrics: dict | None = None,
         created: dt.datetime | None = None, reason: str = "periodic") -> CheckpointInfo:
    """A synthetic CheckpointInfo (created defaults to T0 + step seconds)."""
    created = created if created is not None else T0 + dt.timedelta(seconds=step)
    return CheckpointInfo(name, step, epoch, dict(metrics or {}), created, 0, reason)


# -- a tiny scripted training run ------------------------------------------------------------

BATCHES_PER_EPOCH = 2


def _batches(n: int = BATCHES_PER_EPOCH) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1234)
    return [(torch.randn(8, 4, generator=g), torch.randn(8, 1, generator=g)) for _ in range(n)]


class ScriptedRun:
    """A Trainer on a tiny model whose per-epoch val loss comes from ``val_script``.

    ``fail_at_step`` makes the training loss raise RuntimeError("boom") at that (1-based) step.
    ``val_script=None`` means no val loader (no metrics at all).
    """

    def __init__(self, callbacks: Sequence[Callback], *, max_epochs: int,
                 val_script: Sequence[float] | None = None, batches_per_epoch: int = BATCHES_PER_EPOCH,
                 fail_at_step: int | None = None, max_steps: int | None = None, seed: int = 0) -> None:
        torch.manual_seed(seed)
        self.model = torch.nn.Linear(4, 1)
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=0.05, momentum=0.9)
        self.val_script = list(val_script) if val_script is not None else None
        self.fail_at_step = fail_at_step
        self.trainer = Trainer(
            self.model, self.optimizer, _batches(batches_per_epoch), self._loss,
            val_loader=[None] if val_script is not None else None,
            callbacks=list(callbacks), max_epochs=max_epochs, max_steps=max_steps,
        )

    def _loss(self, model: torch.nn.Module, batch: Any) -> torch.Tensor:
        if not model.training:  # validation: the scripted value of the epoch being finished
            assert self.val_script is not None
            return torch.tensor(float(self.val_script[self.trainer.epoch]))
        if self.fail_at_step is not None and self.trainer.global_step + 1 == self.fail_at_step:
            raise RuntimeError("boom")
        x, y = batch
        return torch.nn.functional.mse_loss(model(x), y)

    def fit(self) -> list[float]:
        return self.trainer.fit()

    def params(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in self.model.state_dict().items()}


class FakeClock:
    """A monotonic clock a test advances by hand (for save_every_seconds)."""

    def __init__(self, start: float = 1000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class SweepClock:
    """A UTC clock for SweepConfig: the real time plus an offset a test moves forward."""

    def __init__(self) -> None:
        self.offset = dt.timedelta(0)

    def __call__(self) -> dt.datetime:
        return dt.datetime.now(dt.timezone.utc) + self.offset

    def advance(self, delta: dt.timedelta) -> None:
        self.offset += delta


class Hook(Callback):
    """A callback built from plain functions, for driving clocks or stops from inside the loop."""

    def __init__(self, *, step: Callable[..., None] | None = None, epoch: Callable[..., None] | None = None) -> None:
        self._step, self._epoch = step, epoch

    def on_step_end(self, trainer, step, logs) -> None:
        if self._step:
            self._step(trainer, step, logs)

    def on_epoch_end(self, trainer, epoch, metrics) -> None:
        if self._epoch:
            self._epoch(trainer, epoch, metrics)


# -- storage inspection -------------------------------------------------------------------------


def manifest_names(store: Storage) -> set[str]:
    return {i.key for i in store.list("") if "/" not in i.key and i.key.endswith(".ckpt")
            and i.key != LATEST_POINTER and not i.key.startswith("best_model_")}


def chunk_keys(store: Storage) -> set[str]:
    return {i.key for i in store.list(CHUNK_PREFIX)}


def referenced_chunk_keys(store: Storage) -> set[str]:
    """Union of the chunks every manifest stored under the root references (read fresh)."""
    mgr = CheckpointManager(store)
    return {c.key for name in manifest_names(store) for c in mgr.manifest(name).chunks}


def pointer_target(store: Storage, key: str) -> str | None:
    pointer = read_pointer(store, key)
    return None if pointer is None else pointer.target


def state_json(store: Storage) -> dict:
    return json.loads(store.get(STATE_KEY))


def best_history(store: Storage, metric: str = "val_loss") -> list[tuple[str, int, int | None, float]]:
    return [(h["name"], h["step"], h["epoch"], h["value"])
            for h in state_json(store).get("best_history", {}).get(metric, [])]


def is_finite(x: float | None) -> bool:
    return x is not None and math.isfinite(x)

