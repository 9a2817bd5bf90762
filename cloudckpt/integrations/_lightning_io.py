"""The Lightning ``CheckpointIO`` plugin of :mod:`cloudckpt.integrations.lightning`, and its path rules.

A Lightning path ``<root>/<name>.ckpt`` is the checkpoint ``<name>.ckpt`` of the
cloudckpt root ``<root>``; see :class:`CloudCheckpointIO`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlparse

import torch
from lightning.fabric.plugins.io.checkpoint_io import CheckpointIO

from ..errors import AlreadyExists, CloudCkptError, CorruptCheckpoint, NotFound
from ..format.serialize import UnsupportedValue
from ..manager import CheckpointManager
from ..pointers import LATEST_POINTER, best_pointer_key, is_pointer_key, read_pointer
from ..storage.base import Storage
from ..transfer import TransferConfig

__all__ = ["LIGHTNING_KEY", "CloudCheckpointIO", "join_path", "split_path"]

#: Key of Lightning's checkpoint dict inside the stored state (beside cloudckpt's RNG state).
LIGHTNING_KEY = "lightning"
_SAVE_OPTIONS = frozenset({"metrics", "reason", "step", "epoch"})
#: URL schemes whose objects Lightning's own CheckpointIO can only read through an fsspec backend.
_CLOUD_SCHEMES = frozenset({"s3", "gs", "gcs"})


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
    With a delegate, a path to read that holds a cloudckpt checkpoint or pointer
    (or a missing object on S3/GCS) still goes to a manager opened for its
    directory.  ``storage_options`` apply to ``root`` and to the S3/GCS roots
    that paths name.

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
            made = self._open(root, None if isinstance(root, Storage) else self.storage_options)
            self.register(made.store.url if isinstance(root, Storage) else root, made)

    def _open(self, root: str | os.PathLike[str] | Storage, options: Mapping[str, Any] | None) -> CheckpointManager:
        manager = CheckpointManager(
            root, storage_options=options, allow_pickle=self.allow_pickle, async_save=self.async_save,
            transfer=self.transfer,
        )
        self._opened.append(manager)
        return manager

    def register(self, root: str | os.PathLike[str], manager: CheckpointManager) -> None:
        """Route the paths ``<root>/<name>`` to ``manager``."""
        self._managers[_root_key(root)] = manager

    def manager_for(self, path: str | os.PathLike[str], *, reading: bool = False) -> tuple[CheckpointManager, str] | None:
        """The manager and checkpoint name for a Lightning path (None: it belongs to the delegate).

        With ``reading``, a path under no registered root is still cloudckpt's when
        the object there is one of cloudckpt's (see the class docstring).
        """
        root, name = split_path(path)
        key = _root_key(root)
        manager = self._managers.get(key)
        if manager is None:
            if self.delegate is not None and not reading:
                return None
            # storage_options (an endpoint, a profile...) are for the cloud roots that paths name
            manager = self._open(root, self.storage_options if _scheme(root) in _CLOUD_SCHEMES else None)
            if self.delegate is not None and not _holds_cloudckpt_object(manager.store, name):
                self._opened.remove(manager)
                manager.close()
                return None
            self._managers[key] = manager
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
        try:
            manager.save({LIGHTNING_KEY: checkpoint}, step=int(step), epoch=None if epoch is None else int(epoch),
                         metrics=options.get("metrics"), reason=options.get("reason", "manual"), name=name)
        except AlreadyExists as exc:
            raise AlreadyExists(
                f"{manager.store.url}/{name} is already committed, and a checkpoint is never replaced (nothing was "
                "deleted).  To go on with the run that saved it, resume from it: trainer.fit(..., "
                "ckpt_path=\"last\") with CloudCheckpointCallback, or the checkpoint's path; to start over, use a "
                "new root; with ModelCheckpoint, use save_last=False and ckpt_path=\"<dirpath>/latest.ckpt\" "
                "(cloudckpt's latest pointer) instead of rewriting last.ckpt"
            ) from exc
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
        routed = self.manager_for(path, reading=True)
        if routed is None:
            assert self.delegate is not None
            if weights_only is None:
                return self.delegate.load_checkpoint(path, map_location=map_location)
            return self.delegate.load_checkpoint(path, map_location=map_location, weights_only=weights_only)
        manager, name = routed
        device = map_location if isinstance(map_location, (str, torch.device)) else None
        which = _which(manager, name, path)
        try:
            state, info = manager.load(which, map_location=device, restore_rng=self.restore_rng)
        except NotFound as exc:
            if which in ("latest", "best") and not manager.list():
                raise NotFound(f"{path}: no checkpoint under {manager.store.url}") from exc
            raise
        lightning_state = state.get(LIGHTNING_KEY)
        if not isinstance(lightning_state, dict):
            raise CloudCkptError(
                f"{manager.store.url}/{info.name} is a cloudckpt checkpoint but not a Lightning one "
                f"(its state has {sorted(state)}, no {LIGHTNING_KEY!r})")
        return lightning_state

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


def _scheme(root: str | os.PathLike[str] | Storage) -> str:
    if isinstance(root, Storage):
        return ""
    text = os.fspath(root)
    return urlparse(text).scheme if "://" in text else ""


def _holds_cloudckpt_object(store: Storage, name: str) -> bool:
    """Whether ``name`` under ``store`` is cloudckpt's to read: a manifest or pointer (JSON), or, on S3/GCS,
    missing (cloudckpt's error says so, where Lightning's own plugin would ask for s3fs or gcsfs)."""
    try:
        return store.get(name, range=(0, 1)) == b"{"
    except NotFound:
        return _scheme(store.url) in _CLOUD_SCHEMES


def _which(manager: CheckpointManager, name: str, path: Any) -> str:
    """What to ask the manager for: ``latest`` and the monitored best resolve there (with its fallbacks);
    the best pointer of another metric names one checkpoint."""
    if name in (LATEST_POINTER, "latest"):
        return "latest"
    if not is_pointer_key(name):
        return name
    if manager.monitor is not None and name == best_pointer_key(manager.monitor):
        return "best"
    try:
        pointer = read_pointer(manager.store, name)
    except CorruptCheckpoint as exc:
        raise NotFound(f"{path}: the pointer cannot be read ({exc})") from exc
    if pointer is None:
        raise NotFound(f"{path}: no best checkpoint under {manager.store.url}")
    return pointer.target
