"""The checkpoint callback: when to save, what to keep, and resuming where training stopped.

A trainer is anything with ``state_dict()`` and ``restore_state(state)``; the
callback is driven through the hooks of :class:`Callback`.
:class:`cloudckpt.Trainer` calls them; so can any loop of your own.
"""

from __future__ import annotations

import logging
import math
import os
import time
from typing import Any, Callable, Literal, Mapping

from .manager import CheckpointInfo, CheckpointManager
from .pointers import is_better
from .preemption import Preempted, PreemptionWatcher
from .retention import RetentionPolicy, rolling_window
from .storage.base import Storage
from .sweeper import SweepConfig
from .transfer import TransferConfig

log = logging.getLogger(__name__)


class Callback:
    """Hooks a training loop calls; every one is optional (the defaults do nothing)."""

    def on_train_begin(self, trainer: Any) -> None:
        """Before the first step (after a restart, too)."""

    def on_step_end(self, trainer: Any, step: int, logs: Mapping[str, float]) -> None:
        """After optimizer step number ``step`` (1-based, counted over the whole run)."""

    def on_epoch_end(self, trainer: Any, epoch: int, metrics: Mapping[str, float]) -> None:
        """After epoch number ``epoch`` (1-based) finished and was validated."""

    def on_train_end(self, trainer: Any) -> None:
        """After the last step."""

    def on_exception(self, trainer: Any, exc: BaseException) -> None:
        """When the loop raises; the exception propagates after every callback ran."""


def _step_of(trainer: Any) -> int:
    return int(getattr(trainer, "global_step", 0))


def _epoch_of(trainer: Any) -> int | None:
    epoch = getattr(trainer, "epoch", None)
    return None if epoch is None else int(epoch)


def _state_of(trainer: Any) -> Mapping[str, Any]:
    live = getattr(trainer, "checkpoint_state", None)
    return live() if callable(live) else trainer.state_dict()


class CheckpointCallback(Callback):
    """Saves checkpoints of a trainer on a schedule, tracks the best one, prunes the rest.

    Triggers combine freely and a step is never saved twice, with one exception:
    when a step-based save falls on the last step of an epoch, the epoch-end save
    that carries the validation metrics still happens (it shares every chunk with
    the first, so it costs one manifest), so best-model tracking sees every epoch.

    * ``save_frequency``: every N epochs (at epoch end);
    * ``save_every_n_steps`` / ``save_every_seconds``: within epochs;
    * ``save_best``: at epoch end whenever ``monitor`` improves (``mode`` min or max);
    * the end of training, and an emergency save when the loop raises;
    * explicit :meth:`save_checkpoint` calls.

    ``keep_last_n`` keeps a rolling window (plus the best one when
    ``save_best``); ``retention=`` takes any policy instead.  With
    ``auto_resume`` (default) ``on_train_begin`` restores the newest checkpoint.

    ``preemption=True`` (or a :class:`~cloudckpt.preemption.PreemptionWatcher`)
    installs SIGTERM handling: at the next step boundary after a notice the
    callback waits for any save in flight, saves a checkpoint marked
    ``preemption`` within the watcher's deadline, and raises
    :class:`~cloudckpt.preemption.Preempted` (exit status 75).
    """

    def __init__(
        self,
        checkpoint_dir: str | os.PathLike[str] | Storage,
        save_frequency: int | None = 1,
        save_best: bool = True,
        monitor: str = "val_loss",
        mode: Literal["min", "max"] = "min",
        keep_last_n: int | None = None,
        async_save: bool = False,
        *,
        save_every_n_steps: int | None = None,
        save_every_seconds: float | None = None,
        save_on_train_end: bool = True,
        save_on_exception: bool = True,
        auto_resume: bool = True,
        retention: RetentionPolicy | Callable[..., set[str]] | None = None,
        cleanup: SweepConfig | None = None,
        storage_options: Mapping[str, Any] | None = None,
        transfer: TransferConfig | None = None,
        on_save_error: Literal["raise", "warn"] = "raise",
        preemption: PreemptionWatcher | bool | None = None,
        clock: Callable[[], float] = time.monotonic,
        manager: CheckpointManager | None = None,
    ) -> None:
        for label, value in (("save_frequency", save_frequency), ("save_every_n_steps", save_every_n_steps),
                             ("keep_last_n", keep_last_n)):
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"{label} must be a positive integer or None, got {value!r}")
        if save_every_seconds is not None and save_every_seconds <= 0:
            raise ValueError(f"save_every_seconds must be positive, got {save_every_seconds!r}")
        if on_save_error not in ("raise", "warn"):
            raise ValueError(f"on_save_error must be 'raise' or 'warn', got {on_save_error!r}")
        retention = rolling_window(keep_last_n, retention, keep_best=save_best)
        self.manager = manager or CheckpointManager(
            checkpoint_dir, monitor=monitor, mode=mode, retention=retention, async_save=async_save,
            storage_options=storage_options, transfer=transfer, cleanup=cleanup,
        )
        self.save_frequency = save_frequency
        self.save_best = save_best
        self.monitor = monitor
        self.mode = mode
        self.save_every_n_steps = save_every_n_steps
        self.save_every_seconds = save_every_seconds
        self.save_on_train_end = save_on_train_end
        self.save_on_exception = save_on_exception
        self.auto_resume = auto_resume
        self.on_save_error = on_save_error
        self.clock = clock
        self.preemption = PreemptionWatcher() if preemption is True else (preemption or None)
        self.best_value: float | None = None
        self.resumed_from: CheckpointInfo | None = None
        self._last_saved_step: int | None = None
        self._last_save_had_metrics = False
        self._warned_missing_metric = False
        self._last_save_time = clock()

    # -- hooks -------------------------------------------------------------------
    def on_train_begin(self, trainer: Any) -> None:
        if self.preemption is not None:
            self.preemption.install()
        best = self.manager.best() if self.save_best else None
        if best is not None:
            self.best_value = best.metrics.get(self.monitor)
        self._last_save_time = self.clock()
        if not self.auto_resume:
            return
        live = getattr(trainer, "checkpoint_state", None)
        if callable(live):
            self.resumed_from = self.manager.restore(live())
        elif self.manager.latest() is not None:
            state, self.resumed_from = self.manager.load("latest", restore_rng=True)
            trainer.restore_state(state)
        if self.resumed_from is not None:
            self._last_saved_step = self.resumed_from.step
            log.info("resumed from %s (step %d)", self.resumed_from.name, self.resumed_from.step)
        else:
            log.info("no checkpoint under %s; starting from scratch", self.manager.store.url)

    def on_step_end(self, trainer: Any, step: int, logs: Mapping[str, float]) -> None:
        if self.preemption is not None and self.preemption.requested:
            self._preempt(trainer)
        due = self.save_every_n_steps is not None and step % self.save_every_n_steps == 0
        if self.save_every_seconds is not None and self.clock() - self._last_save_time >= self.save_every_seconds:
            due = True
        if due:
            self._save(trainer, reason="periodic", metrics=None, name=f"checkpoint_step_{step:08d}.ckpt")

    def on_epoch_end(self, trainer: Any, epoch: int, metrics: Mapping[str, float]) -> None:
        periodic = self.save_frequency is not None and epoch % self.save_frequency == 0
        improved = self.save_best and self._improves(metrics)
        if periodic or improved:
            self._save(trainer, reason="periodic" if periodic else "best", metrics=metrics,
                       name=f"checkpoint_epoch_{epoch:04d}.ckpt", epoch=epoch)
        if self.preemption is not None and self.preemption.requested:
            self._preempt(trainer)

    def on_train_end(self, trainer: Any) -> None:
        if self.save_on_train_end:
            self._save(trainer, reason="final", metrics=None,
                       name=f"checkpoint_step_{_step_of(trainer):08d}.ckpt")
        self._settle_in_flight()
        if self.preemption is not None:
            self.preemption.close()

    def on_exception(self, trainer: Any, exc: BaseException) -> None:
        if self.preemption is not None:
            self.preemption.close()
        if not self.save_on_exception or isinstance(exc, Preempted):
            return
        step = _step_of(trainer)
        try:
            self._save(trainer, reason="exception", metrics=None,
                       name=f"checkpoint_step_{step:08d}_exception.ckpt", raise_errors=True)
            self.manager.wait()
        except Exception as save_error:  # the training error is the one that must propagate
            log.error("emergency checkpoint at step %d failed: %s", step, save_error)

    # -- explicit API --------------------------------------------------------------
    def save_checkpoint(self, trainer: Any, epoch: int | None = None,
                        metrics: Mapping[str, float] | None = None, *, step: int | None = None,
                        name: str | None = None) -> CheckpointInfo:
        """Save now (reason ``manual``), whatever the schedule says; returns the committed info
        (with ``async_save``, a handle whose ``result()`` is the info)."""
        step = _step_of(trainer) if step is None else step
        if name is None:
            name = f"checkpoint_epoch_{epoch:04d}.ckpt" if epoch is not None else f"checkpoint_step_{step:08d}.ckpt"
        info = self.manager.save(_state_of(trainer), step=step, epoch=epoch, metrics=metrics,
                                 reason="manual", name=name)
        self._note_saved(step, metrics)
        return info

    def load_checkpoint(self, which: str | int = "latest") -> dict[str, Any]:
        """The state of a checkpoint (a name, ``"latest"``, ``"best"`` or a step) for ``trainer.restore_state``."""
        state, _ = self.manager.load(which, restore_rng=True)
        return state

    # -- internals -----------------------------------------------------------------
    def _preempt(self, trainer: Any) -> None:
        watcher = self.preemption
        assert watcher is not None and watcher.notice is not None
        reason = watcher.notice.reason
        step = _step_of(trainer)
        try:
            self.manager.wait(timeout=watcher.remaining())  # a save in flight finishes first
        except TimeoutError:
            log.error("the save in flight did not finish within the preemption deadline; "
                      "exiting without a new checkpoint (the previous committed one stays valid)")
            raise Preempted(reason) from None
        except Exception as exc:
            log.error("the save in flight at preemption failed: %s", exc)
        if step != self._last_saved_step:
            try:
                result = self.manager.save(_state_of(trainer), step=step, epoch=_epoch_of(trainer),
                                           reason="preemption", name=f"checkpoint_step_{step:08d}.ckpt")
                if not isinstance(result, CheckpointInfo):
                    result = result.result(timeout=watcher.remaining())
                self._note_saved(step, None)
                log.warning("preemption checkpoint %s committed with %.1f s of the deadline left",
                            result.name, watcher.remaining())
            except Exception as exc:
                log.error("preemption checkpoint at step %d failed: %s", step, exc)
        raise Preempted(reason)


    def _improves(self, metrics: Mapping[str, float]) -> bool:
        value = metrics.get(self.monitor)
        if value is None:
            if not self._warned_missing_metric:  # once: a run without validation would say it every epoch
                log.warning("monitored metric %r missing from epoch metrics %s; no best-model tracking "
                            "(pass save_best=False, or report %r from validation)",
                            self.monitor, sorted(metrics), self.monitor)
                self._warned_missing_metric = True
            return False
        value = float(value)
        if math.isnan(value):
            log.warning("monitored metric %r is NaN; not a new best", self.monitor)
            return False
        return is_better(value, self.best_value, self.mode)

    def _note_saved(self, step: int, metrics: Mapping[str, float] | None) -> None:
        self._last_saved_step = step
        self._last_save_had_metrics = bool(metrics)
        self._last_save_time = self.clock()
        if metrics and self._improves_quietly(metrics):
            self.best_value = float(metrics[self.monitor])

    def _improves_quietly(self, metrics: Mapping[str, float]) -> bool:
        value = metrics.get(self.monitor)
        return value is not None and is_better(float(value), self.best_value, self.mode)

    def _save(self, trainer: Any, *, reason: str, metrics: Mapping[str, float] | None, name: str,
              epoch: int | None = None, raise_errors: bool = False) -> CheckpointInfo | None:
        step = _step_of(trainer)
        if step == self._last_saved_step and (self._last_save_had_metrics or not metrics):
            log.debug("step %d already saved; skipping the %s save", step, reason)
            return None
        epoch = epoch if epoch is not None else _epoch_of(trainer)
        self._settle_in_flight(raise_errors)
        try:
            info = self.manager.save(_state_of(trainer), step=step, epoch=epoch, metrics=metrics,
                                     reason=reason, name=name)
        except Exception as exc:
            if self.on_save_error == "raise" or raise_errors:
                raise
            log.warning("checkpoint %s failed, training continues: %s", name, exc)
            return None
        self._note_saved(step, metrics)
        return info

    def _settle_in_flight(self, raise_errors: bool = False) -> None:
        """Wait for an async save in flight, so that its failure is reported as its own."""
        try:
            self.manager.wait()
        except Exception as exc:
            if self.on_save_error == "raise" or raise_errors:
                raise
            log.warning("a background checkpoint failed, training continues: %s", exc)
