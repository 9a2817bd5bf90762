"""A small reference training loop that drives callbacks, for plain PyTorch users and the examples.

It is deliberately ordinary: forward, loss, backward, step, optional
scheduler and grad scaler, validation at epoch end.  What it adds is the
bookkeeping a resume needs: the epoch, the global step and the position
inside the epoch are part of its state, and with a
:class:`cloudckpt.ResumableSampler` a run resumed mid-epoch sees exactly the
batches an uninterrupted run would have.
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch

from .callback import Callback

log = logging.getLogger(__name__)

LossFn = Callable[[torch.nn.Module, Any], torch.Tensor]


class _Progress:
    """The loop counters, as a stateful object stored in every checkpoint."""

    def __init__(self) -> None:
        self.epoch = 0
        self.global_step = 0
        self.batch_in_epoch = 0

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "global_step": self.global_step, "batch_in_epoch": self.batch_in_epoch}

    def load_state_dict(self, state: Mapping[str, int]) -> None:
        self.epoch = int(state["epoch"])
        self.global_step = int(state["global_step"])
        self.batch_in_epoch = int(state["batch_in_epoch"])


def _sampler_of(loader: Iterable[Any]) -> Any:
    sampler = getattr(loader, "sampler", None)
    batch_sampler = getattr(loader, "batch_sampler", None)
    for candidate in (sampler, getattr(batch_sampler, "sampler", None)):
        if candidate is not None and hasattr(candidate, "state_dict") and hasattr(candidate, "load_state_dict"):
            return candidate
    return None


class Trainer:
    """Train ``model`` with ``optimizer`` on ``train_loader``; call ``callbacks`` at every hook.

    ``loss_fn(model, batch)`` returns the scalar loss of one batch.  Validation
    (when ``val_loader`` is given) reports the mean of ``loss_fn`` over it as
    ``val_loss``.  ``max_steps`` stops early, counted over the whole run.
    ``stop_requested`` may be set (e.g. by a preemption handler) to end the
    loop after the current step.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        train_loader: Iterable[Any],
        loss_fn: LossFn,
        *,
        val_loader: Iterable[Any] | None = None,
        scheduler: Any = None,
        scheduler_interval: str = "step",
        scaler: Any = None,
        callbacks: Sequence[Callback] = (),
        max_epochs: int = 1,
        max_steps: int | None = None,
    ) -> None:
        if scheduler_interval not in ("step", "epoch"):
            raise ValueError(f"scheduler_interval must be 'step' or 'epoch', got {scheduler_interval!r}")
        self.model = model
        self.optimizer = optimizer
        self.train_loader = train_loader
        self.loss_fn = loss_fn
        self.val_loader = val_loader
        self.scheduler = scheduler
        self.scheduler_interval = scheduler_interval
        self.scaler = scaler
        self.callbacks = list(callbacks)
        self.max_epochs = max_epochs
        self.max_steps = max_steps
        self.progress = _Progress()
        self.sampler = _sampler_of(train_loader)
        self.losses: list[float] = []
        self.stop_requested = False

    @property
    def epoch(self) -> int:
        """Epochs completed."""
        return self.progress.epoch

    @property
    def global_step(self) -> int:
        """Optimizer steps taken over the whole run."""
        return self.progress.global_step

    # -- state ---------------------------------------------------------------------
    def checkpoint_state(self) -> dict[str, Any]:
        """The live stateful objects of the run (restored in place by the manager)."""
        state: dict[str, Any] = {"model": self.model, "optimizer": self.optimizer, "progress": self.progress}
        for key, value in (("scheduler", self.scheduler), ("scaler", self.scaler), ("sampler", self.sampler)):
            if value is not None:
                state[key] = value
        return state

    def state_dict(self) -> dict[str, Any]:
        """Plain state dicts of every component."""
        return {key: value.state_dict() for key, value in self.checkpoint_state().items()}

    def restore_state(self, state: Mapping[str, Any]) -> None:
        """Load what :meth:`state_dict` (or ``CheckpointCallback.load_checkpoint``) returned."""
        for key, target in self.checkpoint_state().items():
            if key in state:
                target.load_state_dict(state[key])
            else:
                log.warning("checkpoint has no %r; it keeps its current state", key)

    # -- the loop ------------------------------------------------------------------
    def _call(self, hook: str, *args: Any) -> None:
        for callback in self.callbacks:
            getattr(callback, hook)(self, *args)

    def _done(self) -> bool:
        return self.stop_requested or (self.max_steps is not None and self.global_step >= self.max_steps)

    def fit(self) -> list[float]:
        """Run (or resume) training; returns the loss of every step this call took."""
        try:
            self._call("on_train_begin")
            while self.epoch < self.max_epochs and not self._done():
                if not self._train_epoch():
                    break
                metrics = self.validate()
                self.progress.epoch += 1
                self.progress.batch_in_epoch = 0
                if self.scheduler is not None and self.scheduler_interval == "epoch":
                    self.scheduler.step()
                self._call("on_epoch_end", self.epoch, metrics)
            self._call("on_train_end")
        except BaseException as exc:
            for callback in self.callbacks:
                callback.on_exception(self, exc)
            raise
        return self.losses

    def _train_epoch(self) -> bool:
        """Train the rest of the current epoch; False if stopped before its end."""
        self.model.train()
        skip = 0 if self.sampler is not None else self.progress.batch_in_epoch
        if skip:
            log.warning("resuming mid-epoch without a resumable sampler: skipping %d batches "
                        "(the data order is not the one of an uninterrupted run)", skip)
        for batch in self._batches():
            if skip:
                skip -= 1
                continue
            self.losses.append(self._step(batch))
            self.progress.global_step += 1
            self.progress.batch_in_epoch += 1
            self._call("on_step_end", self.global_step, {"loss": self.losses[-1]})
            if self._done():
                return False
        return True

    def _batches(self) -> Iterable[Any]:
        if self.progress.batch_in_epoch == 0:
            return iter(self.train_loader)
        # A DataLoader draws its base seed from the global generator when an iterator is
        # created.  The uninterrupted run did that at the epoch start, before the RNG state
        # we resumed from was captured, so this draw must not disturb the restored stream.
        with torch.random.fork_rng(devices=[]):
            return iter(self.train_loader)

    def _step(self, batch: Any) -> float:
        self.optimizer.zero_grad(set_to_none=True)
        loss = self.loss_fn(self.model, batch)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            loss.backward()
            self.optimizer.step()
        if self.scheduler is not None and self.scheduler_interval == "step":
            self.scheduler.step()
        return float(loss.detach())

    @torch.no_grad()
    def validate(self) -> dict[str, float]:
        """Mean ``loss_fn`` over ``val_loader`` as ``{"val_loss": ...}`` (empty without a loader)."""
        if self.val_loader is None:
            return {}
        self.model.eval()
        total, count = 0.0, 0
        for batch in self.val_loader:
            total += float(self.loss_fn(self.model, batch))
            count += 1
        self.model.train()
        return {"val_loss": total / max(count, 1)}
