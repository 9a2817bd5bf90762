"""Copying training state into host memory: the only part of a save that blocks training.

A fresh ``clone()`` of a large state page-faults its way through new memory
(about 1 GB/s); a copy into memory that was touched before runs at memory
bandwidth (6-10 GB/s here).  :class:`HostBufferPool` therefore keeps one
large buffer alive across saves and carves every snapshot out of it.  For
CUDA tensors the buffer is pinned and the copies are asynchronous: ``save()``
returns as soon as they are queued, and the background writer waits on a
CUDA event before reading the bytes.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Sequence

import torch

_ALIGN = 64


def _aligned(n: int) -> int:
    return (n + _ALIGN - 1) // _ALIGN * _ALIGN


@dataclass
class Snapshot:
    """Host copies of a state's tensors, valid until the pool is reused."""

    tensors: list[torch.Tensor]
    nbytes: int
    ready: "torch.cuda.Event | None" = None

    def wait_ready(self) -> None:
        """Block until asynchronous device-to-host copies have landed."""
        if self.ready is not None:
            self.ready.synchronize()


class HostBufferPool:
    """One reusable, pre-touched (pinned when CUDA is in play) host buffer for snapshots.

    Not re-entrant: the caller must not take a new snapshot while the previous
    one is still being written (the manager's back-pressure guarantees that).
    """

    def __init__(self) -> None:
        self._buffer: torch.Tensor | None = None
        self._lock = threading.Lock()

    @property
    def capacity(self) -> int:
        return 0 if self._buffer is None else self._buffer.numel()

    def _ensure(self, nbytes: int, pinned: bool) -> torch.Tensor:
        buffer = self._buffer
        if buffer is None or buffer.numel() < nbytes or (pinned and not buffer.is_pinned()):
            self._buffer = None  # release the old buffer before allocating the new one
            buffer = torch.empty(max(nbytes, 1), dtype=torch.uint8, pin_memory=pinned)
            buffer.fill_(0)  # touch every page once, now, instead of during every copy
            self._buffer = buffer
        return buffer

    def snapshot(self, tensors: Sequence[torch.Tensor]) -> Snapshot:
        """Copy ``tensors`` (any device, any layout) into the pool; returns contiguous CPU views."""
        sizes = [t.numel() * t.element_size() for t in tensors]
        offsets, total = [], 0
        for size in sizes:
            offsets.append(total)
            total += _aligned(size)
        on_cuda = any(t.device.type == "cuda" for t in tensors)
        with self._lock:
            buffer = self._ensure(total, pinned=on_cuda and torch.cuda.is_available())
            copies = []
            with torch.no_grad():
                for tensor, offset, size in zip(tensors, offsets, sizes):
                    view = buffer[offset : offset + size].view(tensor.dtype).view(tensor.shape)
                    view.copy_(tensor.detach(), non_blocking=tensor.device.type == "cuda")
                    copies.append(view)
            ready = None
            if on_cuda:
                ready = torch.cuda.Event()
                ready.record()
        return Snapshot(copies, sum(sizes), ready)
