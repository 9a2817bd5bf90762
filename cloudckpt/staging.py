"""Bounded host memory in which a restore verifies chunks before any byte reaches a live tensor.

A :class:`StagingPool` hands out byte buffers while the bytes it has handed out
stay within a budget (``TransferConfig.staging_budget``).  Freed buffers are
kept and reused, so a long restore touches its staging memory once instead of
page-faulting through fresh allocations.  The buffers are pinned when a
destination lives on a CUDA device, so the copies to it are asynchronous DMA.
"""

from __future__ import annotations

import threading

import torch


class StagingPool:
    """Reusable uint8 host buffers whose total size stays within ``budget`` bytes.

    One request larger than the whole budget is still served, alone: a chunk
    must fit somewhere to be verified.
    """

    def __init__(self, budget: int, *, pinned: bool = False) -> None:
        if budget < 1:
            raise ValueError(f"the staging budget must be positive, got {budget}")
        self.budget = budget
        self.pinned = pinned
        self.peak = 0  # most bytes allocated at once (reported by the benchmark)
        self._allocated = 0
        self._free: list[torch.Tensor] = []
        self._cond = threading.Condition()

    def take(self, nbytes: int) -> torch.Tensor:
        """A flat uint8 buffer of at least ``nbytes``; blocks while the budget is in use."""
        with self._cond:
            while True:
                fitting = [n for n, b in enumerate(self._free) if b.numel() >= nbytes]
                if fitting:  # the smallest that fits (by position: tensors compare elementwise)
                    return self._free.pop(min(fitting, key=lambda n: self._free[n].numel()))
                if self._allocated + nbytes <= self.budget or self._allocated == 0:
                    break
                if self._free:  # a free buffer too small to reuse: make room for a bigger one
                    self._allocated -= self._free.pop().numel()
                    continue
                self._cond.wait()
            self._allocated += nbytes
            self.peak = max(self.peak, self._allocated)
        return torch.empty(max(nbytes, 1), dtype=torch.uint8, pin_memory=self.pinned)

    def give(self, buffer: torch.Tensor) -> None:
        """Return a buffer from :meth:`take` for reuse."""
        with self._cond:
            self._free.append(buffer)
            self._cond.notify_all()

    def close(self) -> None:
        """Drop the free buffers (buffers still taken are freed when their holders drop them)."""
        with self._cond:
            for buffer in self._free:
                self._allocated -= buffer.numel()
            self._free.clear()
            self._cond.notify_all()


def wants_pinned(destinations: list[torch.Tensor]) -> bool:
    """Pinned staging pays off (and is possible) only when some destination is on a CUDA device."""
    return any(t.device.type == "cuda" for t in destinations) and torch.cuda.is_available()


def byte_view(tensor: torch.Tensor) -> torch.Tensor:
    """The bytes of a contiguous tensor on any device, as a flat uint8 tensor sharing its memory."""
    flat = tensor.detach().reshape(-1)
    return flat.view(torch.uint8) if flat.dtype != torch.uint8 else flat


def copy_bytes(dest: torch.Tensor, dest_offset: int, source: torch.Tensor, source_offset: int, length: int) -> None:
    """``length`` bytes from a host staging buffer into ``dest`` (a byte view from :func:`byte_view`).

    Copies to a device are asynchronous from pinned memory; call :func:`settle` before reusing ``source``.
    """
    dest[dest_offset : dest_offset + length].copy_(
        source[source_offset : source_offset + length], non_blocking=dest.device.type == "cuda")


def settle(destinations: list[torch.Tensor]) -> None:
    """Wait for the asynchronous copies into the CUDA tensors among ``destinations``."""
    for device in {t.device for t in destinations if t.device.type == "cuda"}:
        torch.cuda.current_stream(device).synchronize()
