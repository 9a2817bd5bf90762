"""State that training needs besides modules and optimizers: RNG streams and data order.

:class:`RNGState` captures and restores Python's ``random``, NumPy's global
generator, torch's CPU generator and every CUDA device's generator.
:class:`ResumableSampler` is a shuffling sampler whose position survives a
restart, so a run resumed mid-epoch sees exactly the batches it would have.
"""

from __future__ import annotations

import logging
import random
from typing import Any, Iterator, Sized

import numpy as np
import torch

log = logging.getLogger(__name__)

#: Key under which the manager stores RNG state in a checkpoint's state tree.
RNG_KEY = "_cloudckpt_rng"


class RNGState:
    """The process's random number generators, as a stateful object."""

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {
            "python": random.getstate(),
            "numpy": np.random.get_state(),
            "torch": torch.get_rng_state(),
        }
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            state["cuda"] = torch.cuda.get_rng_state_all()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        random.setstate(_as_tuple(state["python"]))
        numpy_state = state["numpy"]
        np.random.set_state(tuple(numpy_state))
        torch.set_rng_state(state["torch"].cpu())
        cuda = state.get("cuda")
        if cuda is not None:
            if torch.cuda.is_available() and torch.cuda.device_count() == len(cuda):
                torch.cuda.set_rng_state_all([s.cpu() for s in cuda])
            else:
                log.warning(
                    "checkpoint holds RNG state for %d CUDA devices but %d are visible; "
                    "CUDA generators were not restored", len(cuda),
                    torch.cuda.device_count() if torch.cuda.is_available() else 0,
                )


def _as_tuple(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return tuple(_as_tuple(v) for v in value)
    return value


class ResumableSampler(torch.utils.data.Sampler[int]):
    """Shuffles like ``RandomSampler`` (a fresh permutation each epoch) and can resume mid-epoch.

    The permutation of epoch ``e`` depends only on ``seed`` and ``e``; the
    position counts indices handed out so far in the current epoch.  Pass it
    in the checkpointed state (``state["sampler"] = sampler``).  With
    ``num_workers > 0`` a DataLoader prefetches, so save the position your loop
    actually consumed with :meth:`set_position` before saving.
    """

    def __init__(self, data_source: Sized, *, shuffle: bool = True, seed: int = 0) -> None:
        self.data_source = data_source
        self.shuffle = shuffle
        self.seed = seed
        self.epoch = 0
        self.position = 0

    def __len__(self) -> int:
        return len(self.data_source)

    def _order(self) -> list[int]:
        if not self.shuffle:
            return list(range(len(self.data_source)))
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return torch.randperm(len(self.data_source), generator=generator).tolist()

    def __iter__(self) -> Iterator[int]:
        order = self._order()
        while self.position < len(order):
            index = order[self.position]
            self.position += 1
            yield index
        self.epoch += 1
        self.position = 0

    def set_position(self, position: int) -> None:
        """Declare how many indices of the current epoch the loop has consumed."""
        self.position = position

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch = int(state["epoch"])
        self.position = int(state["position"])
        self.seed = int(state["seed"])
