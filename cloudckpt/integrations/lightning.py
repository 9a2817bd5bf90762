"""Lightning (``lightning.pytorch``) adapter: Lightning's checkpoints in cloudckpt's format, on S3/GCS/local.

Two pieces, usable together or apart::

    import lightning as L
    from cloudckpt.integrations.lightning import CloudCheckpointCallback

    ckpt = CloudCheckpointCallback("s3://bucket/runs/exp1", monitor="val_loss", keep_last_n=3,
                                   storage_options={"endpoint_url": ...})
    trainer = L.Trainer(max_epochs=10, callbacks=[ckpt])
    trainer.fit(model, datamodule, ckpt_path="last")    # the root's latest checkpoint; none: a fresh start
    trainer.test(model, datamodule, ckpt_path="best")   # the best by val_loss

:class:`CloudCheckpointIO` is a Lightning ``CheckpointIO`` plugin: the dict
Lightning builds (``state_dict``, ``optimizer_states``, ``lr_schedulers``,
``loops``, ``callbacks``, ``hyper_parameters`` ...) is stored as raw tensor
bytes plus JSON, never pickled; a value that is neither is refused with an
error naming its place in the dict unless ``allow_pickle=True``.  A path
``<root>/<name>.ckpt`` is the checkpoint ``<name>.ckpt`` of the cloudckpt root
``<root>``; ``<root>/latest.ckpt`` and ``<root>/best_model_<metric>.ckpt`` are
cloudckpt's pointers, so ``ckpt_path="s3://bucket/run/latest.ckpt"`` resumes
from the newest checkpoint.  Which checkpoint ``latest`` and ``best`` are is
the manager's answer (the same as ``CheckpointManager.restore()`` and the CLI
give).  A checkpoint is never replaced: saving a name that is already
committed raises :class:`~cloudckpt.errors.AlreadyExists` naming the fix, and
nothing is deleted.  A path under no root of the plugin is read by cloudckpt
when it holds a cloudckpt checkpoint or pointer (so a run forks from another
run's checkpoint on S3 or GCS without s3fs/gcsfs) and by the delegate
otherwise.

:class:`CloudCheckpointCallback` decides when to save (every N epochs, every N
steps, at the end of training), keeps the best by ``monitor`` and prunes with
cloudckpt's retention policies.  It installs a :class:`CloudCheckpointIO` for
its root in ``setup`` (other paths still go to the trainer's previous plugin),
and it is a Lightning ``Checkpoint``, so Lightning adds no default
``ModelCheckpoint`` beside it.  ``ckpt_path="best"`` and ``ckpt_path="last"``
resolve through it to the root's best and latest checkpoints.  (Lightning
looks for "last" only among ``ModelCheckpoint`` files it can stat with fsspec,
before any callback hook runs; making a ``CloudCheckpointCallback`` therefore
wraps Lightning's ckpt_path parser once, so that "last" asks the callback
first and everything else stays Lightning's.)

Why not ``ModelCheckpoint(dirpath="s3://...")``: ModelCheckpoint opens the
dirpath with fsspec when it is constructed and in ``setup`` (to test for
existing files, list the directory, number versions and find ``last``), and
fsspec refuses ``s3://`` without ``s3fs`` ("Install s3fs to access S3") and
``gs://`` without ``gcsfs``.  With those installed it should work with this
plugin (the manifests are real objects named ``<root>/<name>.ckpt``; untested),
and a local dirpath does (tested); but ``save_last=True`` rewrites ``last.ckpt`` every time,
which a create-only checkpoint refuses (the second save raises ``AlreadyExists``):
the latest pointer, ``<dirpath>/latest.ckpt``, is cloudckpt's "last".

Metrics.  A checkpoint records only metrics that describe its own weights.  A
save at a step boundary leaves out the metrics of a validation run at an
earlier step (they belong to older weights); when a step save falls on the
last step of an epoch, the epoch-end save after validation still happens, with
the fresh validation metrics (it shares every chunk with the step save, so it
costs one manifest), and only it can become the best.

Exact resume.  Lightning does not save the random generators; this plugin
does (python, numpy, torch, CUDA, as they were when the checkpoint was taken)
and sets them when Lightning loads the checkpoint.  The sanity check runs
under ``isolate_rng``, so a resumed ``fit`` draws exactly the random numbers
(shuffling, dropout) the uninterrupted run drew: with ``seed_everything`` and
``deterministic=True`` a run resumed from an epoch-end checkpoint is
bit-identical on CPU.  Mid-epoch checkpoints (``every_n_train_steps``) resume
the loops, but the data order is only reproduced by stateful data loaders.
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Callable, Mapping
from typing import Any, Literal

try:
    from lightning.pytorch.callbacks import Checkpoint
except ImportError as exc:
    raise ImportError(
        "cloudckpt.integrations.lightning needs Lightning 2.x (the `lightning` package); install it with "
        f"pip install 'cloudckpt[lightning]'  (or: pip install lightning)  [{exc}]"
    ) from exc

import torch

from ..manager import CheckpointInfo, CheckpointManager
from ..retention import rolling_window
from ..storage.base import Storage
from ..transfer import TransferConfig
from ._lightning_io import LIGHTNING_KEY, CloudCheckpointIO, _root_key, join_path, split_path

__all__ = ["LIGHTNING_KEY", "CloudCheckpointCallback", "CloudCheckpointIO", "join_path", "split_path"]

log = logging.getLogger(__name__)


# -- the callback ---------------------------------------------------------------------------
class CloudCheckpointCallback(Checkpoint):
    """Saves Lightning checkpoints under one cloudckpt root on a schedule, tracks the best, prunes the rest.

    * ``every_n_epochs``: at the end of every N-th training epoch (after its
      validation), as ``checkpoint_epoch_{epochs finished:04d}.ckpt``;
    * ``every_n_train_steps``: after every N-th optimizer step, as
      ``checkpoint_step_{global_step:08d}.ckpt``, without the metrics of an
      earlier validation; when that step ends an epoch, the epoch's save after
      validation is taken as well (whatever ``every_n_epochs`` says), so that the
      validation metrics land on the weights they were measured on;
    * ``save_on_train_end``: once more when training ends (unless that state is saved);
    * ``monitor``/``mode``: the best pointer follows this logged metric;
    * ``keep_last_n`` keeps the newest N (plus the best with a monitor);
      ``retention=`` takes any cloudckpt policy instead.

    Resume with ``trainer.fit(..., ckpt_path="last")``: the root's latest
    checkpoint, or a fresh start when the root is empty (``latest_path()``
    gives the same path).  ``ckpt_path="best"`` loads the best checkpoint.
    ``storage_options`` also apply to checkpoints of other S3/GCS roots that
    ``ckpt_path`` names (forking a run from another run's checkpoint).
    """

    def __init__(
        self,
        root: str | os.PathLike[str] | Storage,
        *,
        monitor: str | None = None,
        mode: Literal["min", "max"] = "min",
        every_n_epochs: int | None = 1,
        every_n_train_steps: int | None = None,
        save_on_train_end: bool = True,
        keep_last_n: int | None = None,
        retention: Callable[..., set[str]] | None = None,
        async_save: bool = False,
        storage_options: Mapping[str, Any] | None = None,
        transfer: TransferConfig | None = None,
        allow_pickle: bool = False,
        restore_rng: bool = True,
        manager: CheckpointManager | None = None,
    ) -> None:
        for label, value in (("every_n_epochs", every_n_epochs), ("every_n_train_steps", every_n_train_steps),
                             ("keep_last_n", keep_last_n)):
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise ValueError(f"{label} must be a positive integer or None, got {value!r}")
        retention = rolling_window(keep_last_n, retention, keep_best=monitor is not None)
        self.manager = manager or CheckpointManager(
            root, monitor=monitor, mode=mode, retention=retention, async_save=async_save,
            storage_options=storage_options, transfer=transfer, allow_pickle=allow_pickle,
        )
        self.root = _root_key(self.manager.store.url if isinstance(root, Storage) else root)
        self.monitor = monitor
        self.every_n_epochs = every_n_epochs
        self.every_n_train_steps = every_n_train_steps
        self.save_on_train_end = save_on_train_end
        self.restore_rng = restore_rng
        self.storage_options = dict(storage_options or {})
        self.allow_pickle = allow_pickle
        self.last_saved: CheckpointInfo | None = None
        # What the weights of the last save had seen: (global step, validations run so far).
        self._last_saved: tuple[int, int] | None = None
        self._validations = 0  # validation runs during fit (not the sanity check)
        self._validated_step: int | None = None  # global step of the last one
        self._validation_keys: set[str] = set()  # metrics that validation logs
        self._keys_before_validation: set[str] = set()
        _resolve_last_through_callbacks()

    @property
    def state_key(self) -> str:
        return self._generate_state_key(root=self.root, monitor=self.monitor)

    # paths ----------------------------------------------------------------------------
    def path_of(self, name: str) -> str:
        """The Lightning path (for ``ckpt_path=``) of checkpoint ``name`` under this root."""
        return join_path(self.root, name)

    def latest_path(self) -> str | None:
        """Path of the newest checkpoint, or None when there is none (``fit(ckpt_path=...)`` starts fresh)."""
        info = self.manager.latest()
        return None if info is None else self.path_of(info.name)

    def best_path(self) -> str | None:
        """Path of the best checkpoint by ``monitor``, or None."""
        info = self.manager.best() if self.monitor else None
        return None if info is None else self.path_of(info.name)

    @property
    def best_model_path(self) -> str:
        """What Lightning's ``ckpt_path="best"`` loads ("" when there is no best checkpoint)."""
        return self.best_path() or ""

    # hooks ----------------------------------------------------------------------------
    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        """Route this root's paths through a CloudCheckpointIO (before Lightning restores ``ckpt_path``)."""
        io = trainer.strategy.checkpoint_io
        if not isinstance(io, CloudCheckpointIO):
            io = CloudCheckpointIO(delegate=io, restore_rng=self.restore_rng, storage_options=self.storage_options,
                                   allow_pickle=self.allow_pickle)
            trainer.strategy.checkpoint_io = io
        io.register(self.root, self.manager)

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        if trainer.ckpt_path:  # resumed: the state at this step is saved already
            self._last_saved = (int(trainer.global_step), self._validations)

    def on_validation_start(self, trainer: Any, pl_module: Any) -> None:
        self._keys_before_validation = set(trainer.callback_metrics)

    def on_validation_end(self, trainer: Any, pl_module: Any) -> None:
        self._validation_keys |= set(trainer.callback_metrics) - self._keys_before_validation
        if not trainer.sanity_checking:
            self._validations += 1
            self._validated_step = int(trainer.global_step)

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        step = trainer.global_step
        if self.every_n_train_steps and step > 0 and step % self.every_n_train_steps == 0:
            self._save(trainer, f"checkpoint_step_{step:08d}.ckpt", reason="periodic")

    def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        finished = trainer.current_epoch + 1
        periodic = bool(self.every_n_epochs) and finished % self.every_n_epochs == 0
        step = int(trainer.global_step)
        validated_since_saved = self._last_saved is not None and self._last_saved[0] == step \
            and self._last_saved[1] < self._validations
        if periodic or validated_since_saved:
            self._save(trainer, f"checkpoint_epoch_{finished:04d}.ckpt", reason="periodic", epoch=finished)

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        if self.save_on_train_end:
            self._save(trainer, f"checkpoint_step_{trainer.global_step:08d}.ckpt", reason="final")
        self.manager.wait()

    def _save(self, trainer: Any, name: str, *, reason: str, epoch: int | None = None) -> None:
        step = int(trainer.global_step)
        seen = (step, self._validations)
        if seen == self._last_saved or trainer.sanity_checking:
            return
        options = {"metrics": self._own_metrics(trainer), "reason": reason, "step": step,
                   "epoch": trainer.current_epoch if epoch is None else epoch}
        trainer.save_checkpoint(self.path_of(name), storage_options=options)
        self._last_saved = seen

    def _own_metrics(self, trainer: Any) -> dict[str, float]:
        """The logged metrics that describe the weights as they are now: validation metrics only when
        validation ran at this very step (otherwise they were measured on older weights)."""
        metrics = _scalar_metrics(trainer.callback_metrics)
        if self._validated_step == int(trainer.global_step):
            return metrics
        return {k: v for k, v in metrics.items() if k not in self._validation_keys}


def _resolve_last_through_callbacks() -> None:
    """Make Lightning's ``ckpt_path="last"`` ask :class:`CloudCheckpointCallback` (once per process).

    Lightning turns "last" into a path before any callback hook runs, looking only at
    ``ModelCheckpoint`` files it can stat through fsspec; its parser is wrapped so that
    the first CloudCheckpointCallback with a checkpoint answers "last", and every other
    case (no such callback, an empty root, any other ``ckpt_path``) stays Lightning's.
    """
    try:
        from lightning.pytorch.trainer.connectors.checkpoint_connector import _CheckpointConnector
    except ImportError:
        _CheckpointConnector = None
    parse = getattr(_CheckpointConnector, "_parse_ckpt_path", None)
    if parse is None:  # a Lightning that moved it: "last" then finds only ModelCheckpoint files
        log.warning("this Lightning version resolves ckpt_path='last' without CloudCheckpointCallback; "
                    "resume with ckpt_path=callback.latest_path() instead")
        return
    if getattr(parse, "_asks_cloudckpt", False):
        return

    @functools.wraps(parse)
    def parse_ckpt_path(self: Any, state_fn: Any, ckpt_path: Any, *args: Any, **kwargs: Any) -> Any:
        if ckpt_path == "last":
            for callback in self.trainer.checkpoint_callbacks:
                latest = callback.latest_path() if isinstance(callback, CloudCheckpointCallback) else None
                if latest is not None:
                    return latest
        return parse(self, state_fn, ckpt_path, *args, **kwargs)

    parse_ckpt_path._asks_cloudckpt = True  # type: ignore[attr-defined]
    _CheckpointConnector._parse_ckpt_path = parse_ckpt_path


def _scalar_metrics(metrics: Mapping[str, Any]) -> dict[str, float]:
    found = {}
    for key, value in metrics.items():
        if isinstance(value, torch.Tensor):
            if value.numel() != 1:
                continue
            value = value.item()
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            found[str(key)] = float(value)
    return found
