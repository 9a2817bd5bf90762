"""Lightning (``lightning.pytorch``) adapter: Lightning's checkpoints in cloudckpt's format, on S3/GCS/local.

Two pieces, usable together or apart::

    import lightning as L
    from cloudckpt.integrations.lightning import CloudCheckpointCallback

    ckpt = CloudCheckpointCallback("s3://bucket/runs/exp1", monitor="val_loss", keep_last_n=3,
                                   storage_options={"endpoint_url": ...})
    trainer = L.Trainer(max_epochs=10, callbacks=[ckpt])
    trainer.fit(model, datamodule, ckpt_path=ckpt.latest_path())   # None on the first run
    trainer.test(model, datamodule, ckpt_path="best")               # the best by val_loss

:class:`CloudCheckpointIO` is a Lightning ``CheckpointIO`` plugin: the dict
Lightning builds (``state_dict``, ``optimizer_states``, ``lr_schedulers``,
``loops``, ``callbacks``, ``hyper_parameters`` ...) is stored as raw tensor
bytes plus JSON, never pickled; a value that is neither is refused with an
error naming its place in the dict unless ``allow_pickle=True``.  A path
``<root>/<name>.ckpt`` is the checkpoint ``<name>.ckpt`` of the cloudckpt root
``<root>``; ``<root>/latest.ckpt`` and ``<root>/best_model_<metric>.ckpt`` are
cloudckpt's pointers, so ``ckpt_path="s3://bucket/run/latest.ckpt"`` resumes
from the newest checkpoint.

:class:`CloudCheckpointCallback` decides when to save (every N epochs, every N
steps, at the end of training), keeps the best by ``monitor`` and prunes with
cloudckpt's retention policies.  It installs a :class:`CloudCheckpointIO` for
its root in ``setup`` (other paths still go to the trainer's previous plugin),
and it is a Lightning ``Checkpoint``, so Lightning adds no default
``ModelCheckpoint`` beside it and ``ckpt_path="best"`` works.

Why not ``ModelCheckpoint(dirpath="s3://...")``: ModelCheckpoint opens the
dirpath with fsspec when it is constructed and in ``setup`` (to test for
existing files, list the directory, number versions and find ``last``), and
fsspec refuses ``s3://`` without ``s3fs`` ("Install s3fs to access S3") and
``gs://`` without ``gcsfs``.  With those installed it should work with this
plugin (the manifests are real objects named ``<root>/<name>.ckpt``; untested),
and a local dirpath does (tested); but ``save_last=True`` rewrites ``last.ckpt`` every time,
which a create-only checkpoint can only do by deleting the old one first (a
short window without ``last.ckpt``): the latest pointer is the better "last".

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

import logging
import os
from collections.abc import Callable, Mapping
from typing import Any, Literal

try:
    from lightning.fabric.plugins.io.checkpoint_io import CheckpointIO
    from lightning.pytorch.callbacks import Checkpoint
except ImportError as exc:
    raise ImportError(
        "cloudckpt.integrations.lightning needs Lightning 2.x (the `lightning` package); install it with "
        f"pip install 'cloudckpt[lightning]'  (or: pip install lightning)  [{exc}]"
    ) from exc

import torch

from ..errors import CloudCkptError, CorruptCheckpoint, FormatVersionError, NotFound
from ..format.serialize import UnsupportedValue
from ..manager import CheckpointInfo, CheckpointManager
from ..pointers import BEST_POINTER_PREFIX, LATEST_POINTER, is_pointer_key, read_pointer
from ..retention import rolling_window
from ..storage.base import Storage
from ..transfer import TransferConfig

__all__ = ["LIGHTNING_KEY", "CloudCheckpointCallback", "CloudCheckpointIO", "join_path", "split_path"]

log = logging.getLogger(__name__)

#: Key of Lightning's checkpoint dict inside the stored state (beside cloudckpt's RNG state).
LIGHTNING_KEY = "lightning"
_SAVE_OPTIONS = frozenset({"metrics", "reason", "step", "epoch"})


# -- paths ---------------------------------------------------------------------------
def _root_key(root: str | os.PathLike[str]) -> str:
    """One spelling per root: URLs without a trailing slash, local paths absolute."""
    text = os.fspath(root)
    if "://" in text:
        scheme, rest = text.split("://", 1)
        return f"{scheme}://{rest.rstrip('/')}"
    return os.path.abspath(os.path.expanduser(text))


def split_path(path: str | os.PathLike[str]) -> tuple[str, str]:
    """``"s3://b/run/x.ckpt"`` -> ``("s3://b/run", "x.ckpt")``; local paths come back absolute."""
    text = os.fspath(path)
    if "://" in text:
        scheme, rest = text.split("://", 1)
        parent, _, name = rest.rpartition("/")
        return f"{scheme}://{parent}", name
    return os.path.split(os.path.abspath(os.path.expanduser(text)))


def join_path(root: str, name: str) -> str:
    """The Lightning path of checkpoint ``name`` under ``root`` (inverse of :func:`split_path`)."""
    if "://" in root:
        return root + name if root.endswith("/") else f"{root}/{name}"
    return os.path.join(root, name)


# -- the CheckpointIO plugin ---------------------------------------------------------------
class CloudCheckpointIO(CheckpointIO):
    """Lightning ``CheckpointIO`` that stores checkpoints with cloudckpt (``Trainer(plugins=[...])``).

    ``root`` (a URL, a path or a Storage) gets a :class:`CheckpointManager`
    made with the other arguments; ``manager=`` passes one ready-made.  A path
    whose directory is a registered root goes to that manager; any other path
    goes to ``delegate`` (a CheckpointIO, e.g. Lightning's ``TorchCheckpointIO``)
    if one is given, else to a manager opened for its directory on first use.

    ``restore_rng`` sets the process's random generators from the checkpoint
    when Lightning loads it (needed for a bit-identical resume).
    """

    def __init__(
        self,
        root: str | os.PathLike[str] | Storage | None = None,
        *,
        storage_options: Mapping[str, Any] | None = None,
        allow_pickle: bool = False,
        async_save: bool = False,
        transfer: TransferConfig | None = None,
        restore_rng: bool = True,
        delegate: CheckpointIO | None = None,
        manager: CheckpointManager | None = None,
    ) -> None:
        self.storage_options = dict(storage_options or {})
        self.allow_pickle = allow_pickle
        self.async_save = async_save
        self.transfer = transfer
        self.restore_rng = restore_rng
        self.delegate = delegate
        self._managers: dict[str, CheckpointManager] = {}
        self._opened: list[CheckpointManager] = []  # the managers this plugin made (and closes)
        if manager is not None:
            self.register(manager.store.url if root is None or isinstance(root, Storage) else root, manager)
        elif root is not None:
            made = self._open(root)
            self.register(made.store.url if isinstance(root, Storage) else root, made)

    def _open(self, root: str | os.PathLike[str] | Storage) -> CheckpointManager:
        manager = CheckpointManager(
            root, storage_options=None if isinstance(root, Storage) else self.storage_options,
            allow_pickle=self.allow_pickle, async_save=self.async_save, transfer=self.transfer,
        )
        self._opened.append(manager)
        return manager

    def register(self, root: str | os.PathLike[str], manager: CheckpointManager) -> None:
        """Route the paths ``<root>/<name>`` to ``manager``."""
        self._managers[_root_key(root)] = manager

    def manager_for(self, path: str | os.PathLike[str]) -> tuple[CheckpointManager, str] | None:
        """The manager and checkpoint name for a Lightning path (None: it belongs to the delegate)."""
        root, name = split_path(path)
        key = _root_key(root)
        manager = self._managers.get(key)
        if manager is None:
            if self.delegate is not None:
                return None
            manager = self._managers[key] = self._open(root)
        return manager, name

    # CheckpointIO -----------------------------------------------------------------
    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None) -> None:
        """Commit ``checkpoint`` as ``<name>`` under its root.

        ``storage_options`` may be a dict with ``metrics`` (for best tracking
        and listings), ``reason``, ``step`` and ``epoch`` for the manifest;
        by default step and epoch are Lightning's ``global_step`` and ``epoch``.
        """
        routed = self.manager_for(path)
        if routed is None:
            assert self.delegate is not None
            return self.delegate.save_checkpoint(checkpoint, path, storage_options=storage_options)
        manager, name = routed
        options = _save_options(storage_options)
        step = options.get("step", checkpoint.get("global_step", 0))
        epoch = options.get("epoch", checkpoint.get("epoch"))
        manager.wait()  # a save of the same name in flight must be committed before we look for it
        if _exists(manager, name):
            log.info("replacing %s/%s (delete, then save: checkpoints are create-only)", manager.store.url, name)
            manager.delete(name)
        try:
            manager.save({LIGHTNING_KEY: checkpoint}, step=int(step), epoch=None if epoch is None else int(epoch),
                         metrics=options.get("metrics"), reason=options.get("reason", "manual"), name=name)
        except UnsupportedValue as exc:
            raise UnsupportedValue(
                f"{exc}.  This Lightning checkpoint holds a value cloudckpt stores only pickled; "
                "pass CloudCheckpointIO(allow_pickle=True) (or CloudCheckpointCallback(allow_pickle=True)) "
                "to store it so, or keep it out of the checkpoint (e.g. save_hyperparameters(ignore=[...]))"
            ) from exc

    def load_checkpoint(self, path: Any, map_location: Any = None, weights_only: bool | None = None) -> dict[str, Any]:
        """Lightning's checkpoint dict from ``path`` (a checkpoint, ``latest.ckpt`` or a best pointer).

        ``weights_only`` is moot: nothing is unpickled unless the plugin was made
        with ``allow_pickle=True``.  For ``latest``, a checkpoint that fails
        verification is skipped for the newest one that loads.
        """
        routed = self.manager_for(path)
        if routed is None:
            assert self.delegate is not None
            if weights_only is None:
                return self.delegate.load_checkpoint(path, map_location=map_location)
            return self.delegate.load_checkpoint(path, map_location=map_location, weights_only=weights_only)
        manager, name = routed
        device = map_location if isinstance(map_location, (str, torch.device)) else None
        candidates = _candidates(manager, name, path)
        first_error: Exception | None = None
        for candidate in candidates:
            try:
                state, info = manager.load(candidate, map_location=device, restore_rng=self.restore_rng)
            except (CorruptCheckpoint, FormatVersionError) as exc:
                log.warning("cannot load %s/%s: %s", manager.store.url, candidate, exc)
                first_error = first_error or exc
                continue
            except NotFound as exc:
                raise NotFound(f"{path}: no such checkpoint") from exc
            if candidate != candidates[0]:
                log.warning("loaded %s instead of %s", candidate, candidates[0])
            lightning_state = state.get(LIGHTNING_KEY)
            if not isinstance(lightning_state, dict):
                raise CloudCkptError(
                    f"{manager.store.url}/{info.name} is a cloudckpt checkpoint but not a Lightning one "
                    f"(its state has {sorted(state)}, no {LIGHTNING_KEY!r})")
            return lightning_state
        if first_error is not None:
            raise first_error
        raise NotFound(f"{path}: no checkpoint under {manager.store.url}")

    def remove_checkpoint(self, path: Any) -> None:
        """Delete the checkpoint (its manifest; its chunks go at the next sweep)."""
        routed = self.manager_for(path)
        if routed is None:
            assert self.delegate is not None
            return self.delegate.remove_checkpoint(path)
        manager, name = routed
        if is_pointer_key(name):
            raise ValueError(f"{path} is a pointer, not a checkpoint; it cannot be removed")
        manager.delete(name)

    def teardown(self) -> None:
        """Wait for saves in flight (raising the error of one that failed)."""
        try:
            for manager in self._managers.values():
                manager.wait()
        finally:
            if self.delegate is not None:
                self.delegate.teardown()

    def close(self) -> None:
        """Finish pending saves and close the managers this plugin opened."""
        self.teardown()
        for manager in self._opened:
            manager.close()


def _save_options(options: Any) -> dict[str, Any]:
    if options is None:
        return {}
    if not isinstance(options, Mapping) or not set(options) <= _SAVE_OPTIONS:
        raise TypeError(
            f"CloudCheckpointIO storage_options must be a dict with keys among {sorted(_SAVE_OPTIONS)}, "
            f"got {options!r}")
    return {k: v for k, v in options.items() if v is not None}


def _exists(manager: CheckpointManager, name: str) -> bool:
    try:
        manager.store.head(name)
    except NotFound:
        return False
    return True




def _candidates(manager: CheckpointManager, name: str, path: Any) -> list[str]:
    """Checkpoint names to try for a Lightning path: pointers resolved, ``latest`` with fallbacks."""
    if name in (LATEST_POINTER, "latest"):
        pointed = _pointer_target(manager, LATEST_POINTER)
        infos = sorted(manager.list(), key=lambda i: (i.step, i.name == pointed, i.created), reverse=True)
        if not infos:
            raise NotFound(f"{path}: no checkpoint under {manager.store.url}")
        return [i.name for i in infos]
    if name.startswith(BEST_POINTER_PREFIX) and is_pointer_key(name):
        target = _pointer_target(manager, name)
        if target is None:
            raise NotFound(f"{path}: no best checkpoint under {manager.store.url}")
        return [target]
    return [name]


def _pointer_target(manager: CheckpointManager, key: str) -> str | None:
    try:
        pointer = read_pointer(manager.store, key)
    except CorruptCheckpoint as exc:
        log.warning("ignoring pointer: %s", exc)
        return None
    return None if pointer is None else pointer.target


# -- the callback ---------------------------------------------------------------------------
class CloudCheckpointCallback(Checkpoint):
    """Saves Lightning checkpoints under one cloudckpt root on a schedule, tracks the best, prunes the rest.

    * ``every_n_epochs``: at the end of every N-th training epoch (after its
      validation), as ``checkpoint_epoch_{epochs finished:04d}.ckpt``;
    * ``every_n_train_steps``: after every N-th optimizer step, as
      ``checkpoint_step_{global_step:08d}.ckpt``;
    * ``save_on_train_end``: once more when training ends (unless that step is saved);
    * ``monitor``/``mode``: the best pointer follows this logged metric;
    * ``keep_last_n`` keeps the newest N (plus the best with a monitor);
      ``retention=`` takes any cloudckpt policy instead.

    Resume with ``trainer.fit(..., ckpt_path=callback.latest_path())`` (None
    when the root is empty: a fresh start).  ``best_model_path`` makes
    ``trainer.test(ckpt_path="best")`` load the best checkpoint.
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
        self.last_saved: CheckpointInfo | None = None
        self._last_saved_step: int | None = None

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
            io = CloudCheckpointIO(delegate=io, restore_rng=self.restore_rng)
            trainer.strategy.checkpoint_io = io
        io.register(self.root, self.manager)

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        step = trainer.global_step
        if self.every_n_train_steps and step > 0 and step % self.every_n_train_steps == 0:
            self._save(trainer, f"checkpoint_step_{step:08d}.ckpt", reason="periodic")

    def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        finished = trainer.current_epoch + 1
        if self.every_n_epochs and finished % self.every_n_epochs == 0:
            self._save(trainer, f"checkpoint_epoch_{finished:04d}.ckpt", reason="periodic", epoch=finished)

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        if self.save_on_train_end:
            self._save(trainer, f"checkpoint_step_{trainer.global_step:08d}.ckpt", reason="final")
        self.manager.wait()

    def _save(self, trainer: Any, name: str, *, reason: str, epoch: int | None = None) -> None:
        step = int(trainer.global_step)
        if step == self._last_saved_step or trainer.sanity_checking:
            return
        options = {"metrics": _scalar_metrics(trainer.callback_metrics), "reason": reason, "step": step,
                   "epoch": trainer.current_epoch if epoch is None else epoch}
        trainer.save_checkpoint(self.path_of(name), storage_options=options)
        self._last_saved_step = step


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
