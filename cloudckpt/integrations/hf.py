"""Hugging Face ``transformers.Trainer`` adapter: its checkpoints kept by cloudckpt on S3/GCS/local.

    from transformers import Trainer, TrainingArguments
    from cloudckpt.integrations.hf import CloudCheckpointCallback

    ckpt = CloudCheckpointCallback("s3://bucket/runs/exp1", keep_last_n=3, monitor="eval_loss")
    args = TrainingArguments(output_dir="out", save_strategy="steps", save_steps=500, save_total_limit=1)
    trainer = Trainer(model=model, args=args, train_dataset=ds, callbacks=[ckpt])
    trainer.train(resume_from_checkpoint=ckpt.resume_from_checkpoint())   # None on the first run

Saving.  Whenever the Trainer saves (its ``save_strategy``/``save_steps``;
``on_save``), the callback commits a cloudckpt checkpoint
``checkpoint_step_{global_step:08d}.ckpt`` with the model's and optimizer's
state, the LR scheduler, the ``TrainerState`` (as JSON) and the random
generators in the Trainer's own layout; tensors are raw bytes, the rest
JSON, nothing is pickled.  Retention (``keep_last_n``/``retention``) and the
best pointer (``monitor``, a logged metric such as ``eval_loss``) are
cloudckpt's.  The Trainer's local ``checkpoint-N`` folders are still written;
``save_total_limit=1`` keeps them to one.  Only the main process saves.

Resuming.  The Trainer resumes only from a local folder, and its resume
logic (which batches to skip, when to set the random generators) is subtle,
so :meth:`CloudCheckpointCallback.resume_from_checkpoint` rebuilds the
checkpoint as a ``checkpoint-N`` folder the Trainer reads itself
(``model.safetensors``, ``optimizer.pt``, ``scheduler.pt``, ``rng_state.pth``,
``trainer_state.json``) and returns its path.  The ``.pt``/``.pth`` files are
written here from verified data and the Trainer loads them with
``torch.load(weights_only=True)``.  A folder the callback made in the system's
temporary directory is removed as soon as the Trainer has read all of it (at
its first training step, or when training ends), and at the latest when the
callback is garbage-collected or the interpreter exits; a ``local_dir`` you
pass is yours to keep.

Not covered: DeepSpeed/FSDP sharded states, a mixed-precision GradScaler,
and the per-rank random generators of multi-process runs (rank 0's are kept).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import shutil
import tempfile
import weakref
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Literal

try:
    from transformers import TrainerCallback
except ImportError as exc:
    raise ImportError(
        "cloudckpt.integrations.hf needs transformers (and accelerate, which its Trainer uses); install them "
        f"with pip install 'cloudckpt[hf]'  (or: pip install transformers accelerate)  [{exc}]"
    ) from exc

import numpy as np
import torch

from ..manager import CheckpointInfo, CheckpointManager
from ..retention import rolling_window
from ..storage.base import Storage
from ..transfer import TransferConfig

__all__ = ["CloudCheckpointCallback", "write_trainer_checkpoint"]

#: Files of a Trainer checkpoint folder (transformers' own names).
WEIGHTS_FILE = "model.safetensors"
OPTIMIZER_FILE = "optimizer.pt"
SCHEDULER_FILE = "scheduler.pt"
RNG_FILE = "rng_state.pth"
TRAINER_STATE_FILE = "trainer_state.json"


class CloudCheckpointCallback(TrainerCallback):
    """Commits a cloudckpt checkpoint every time the Trainer saves; rebuilds one for ``resume_from_checkpoint``.

    ``root`` is any root :class:`~cloudckpt.CheckpointManager` takes (or pass
    ``manager=``).  ``keep_last_n`` keeps the newest N (plus the best with a
    ``monitor``); ``retention=`` takes any cloudckpt policy instead.
    """

    def __init__(
        self,
        root: str | os.PathLike[str] | Storage,
        *,
        monitor: str | None = None,
        mode: Literal["min", "max"] = "min",
        keep_last_n: int | None = None,
        retention: Callable[..., set[str]] | None = None,
        async_save: bool = False,
        storage_options: Mapping[str, Any] | None = None,
        transfer: TransferConfig | None = None,
        manager: CheckpointManager | None = None,
    ) -> None:
        retention = rolling_window(keep_last_n, retention, keep_best=monitor is not None)
        # The random generators are stored in the Trainer's own layout (see _rng_state), not cloudckpt's.
        self.manager = manager or CheckpointManager(
            root, monitor=monitor, mode=mode, retention=retention, async_save=async_save,
            storage_options=storage_options, transfer=transfer, capture_rng=False,
        )
        self.monitor = monitor
        self.last_saved: CheckpointInfo | None = None
        self._scratch: list[weakref.finalize] = []  # temporary resume folders, removed once read

    # -- TrainerCallback ------------------------------------------------------------------
    def on_save(self, args: Any, state: Any, control: Any, model: Any = None, optimizer: Any = None,
                lr_scheduler: Any = None, **kwargs: Any) -> None:
        if not state.is_world_process_zero:
            return
        if model is None:
            raise ValueError("the Trainer passed no model to on_save; nothing to checkpoint")
        payload: dict[str, Any] = {
            "model": model,
            "trainer_state": dataclasses.asdict(state),
            "rng": _rng_state(),
        }
        if optimizer is not None:
            payload["optimizer"] = optimizer
        if lr_scheduler is not None:
            payload["scheduler"] = lr_scheduler
        step = int(state.global_step)
        saved = self.manager.save(
            payload, step=step, epoch=None if state.epoch is None else math.floor(state.epoch),
            metrics=_latest_metrics(state.log_history), reason="periodic", name=f"checkpoint_step_{step:08d}.ckpt",
        )
        if isinstance(saved, CheckpointInfo):
            self.last_saved = saved

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        # The Trainer reads the whole resume folder (the random generators last) before its first step.
        self.remove_resume_folders()

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.remove_resume_folders()
        self.manager.wait()

    def remove_resume_folders(self) -> None:
        """Delete the temporary folders :meth:`resume_from_checkpoint` made (not a ``local_dir`` you passed)."""
        while self._scratch:
            self._scratch.pop()()

    # -- resuming ---------------------------------------------------------------------------
    def resume_from_checkpoint(self, local_dir: str | os.PathLike[str] | None = None,
                               which: str | int = "latest") -> str | None:
        """Rebuild checkpoint ``which`` as a Trainer ``checkpoint-N`` folder; its path, or None if there is none.

        The folder goes under ``local_dir`` (a new temporary directory by default).
        """
        if which == "latest" and self.manager.latest() is None:
            return None
        state, info = self.manager.load(which)
        if local_dir is not None:
            folder = Path(local_dir) / f"checkpoint-{info.step}"
            write_trainer_checkpoint(state, folder)
            return str(folder)
        scratch = tempfile.mkdtemp(prefix="cloudckpt-hf-")
        # Removed once the Trainer has read it, or when this callback goes away or the interpreter exits.
        self._scratch.append(weakref.finalize(self, shutil.rmtree, scratch, ignore_errors=True))
        folder = Path(scratch) / f"checkpoint-{info.step}"
        try:
            write_trainer_checkpoint(state, folder)
        except BaseException:
            self.remove_resume_folders()
            raise
        return str(folder)


def write_trainer_checkpoint(state: Mapping[str, Any], folder: str | os.PathLike[str]) -> None:
    """Write a loaded cloudckpt state (see :class:`CloudCheckpointCallback`) as a Trainer checkpoint folder."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(_unshared(state["model"]), str(folder / WEIGHTS_FILE), metadata={"format": "pt"})
    if "optimizer" in state:
        torch.save(state["optimizer"], folder / OPTIMIZER_FILE)
    if "scheduler" in state:
        torch.save(state["scheduler"], folder / SCHEDULER_FILE)
    if "rng" in state:
        torch.save(_as_trainer_rng(state["rng"]), folder / RNG_FILE)
    (folder / TRAINER_STATE_FILE).write_text(json.dumps(state["trainer_state"], indent=2, sort_keys=True) + "\n")


def _rng_state() -> dict[str, Any]:
    """The generators as ``Trainer._save_rng_state`` keeps them (single process)."""
    rng: dict[str, Any] = {"python": random.getstate(), "numpy": np.random.get_state(),
                           "cpu": torch.random.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        rng["cuda"] = torch.cuda.random.get_rng_state()
    return rng


def _as_trainer_rng(rng: Mapping[str, Any]) -> dict[str, Any]:
    def as_tuple(value: Any) -> Any:
        return tuple(as_tuple(v) for v in value) if isinstance(value, (list, tuple)) else value

    restored = dict(rng)
    restored["python"] = as_tuple(rng["python"])
    restored["numpy"] = tuple(rng["numpy"])
    return restored


def _unshared(weights: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The state dict with tied tensors (one tensor under two names) copied apart, as safetensors needs."""
    seen: set[int] = set()  # storages already written
    out = {}
    for key, tensor in weights.items():
        tensor = tensor.detach().contiguous()
        if tensor.untyped_storage().data_ptr() in seen:
            tensor = tensor.clone()
        seen.add(tensor.untyped_storage().data_ptr())
        out[key] = tensor
    return out


def _latest_metrics(log_history: list[dict[str, Any]]) -> dict[str, float]:
    """The newest value of every numeric metric logged so far (``loss``, ``eval_loss``, ...)."""
    found: dict[str, float] = {}
    for entry in log_history:
        for key, value in entry.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool) and key not in ("step", "epoch"):
                found[key] = float(value)
    return found
