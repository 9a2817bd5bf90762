"""Promise 6: unchanged data is not uploaded twice; a changed layer costs about its own size."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from typing import TypeVar

import pytest
import torch

from cloudckpt import CheckpointManager, MemoryStorage, TransferConfig
from cloudckpt.pointers import LATEST_POINTER, STATE_KEY
from cloudckpt.storage.faults import FaultyStorage

T = TypeVar("T")
KiB, MiB = 1024, 1024 * 1024


class CountingStorage(FaultyStorage):
    """FaultyStorage (no faults) that also keeps the bytes put (put + upload_part) per key."""

    def __init__(self, inner) -> None:
        super().__init__(inner)
        self.bytes_by_key: Counter[str] = Counter()

    def _run(self, verb: str, key: str, fn: Callable[[], T], nbytes: int = 0) -> T:
        result = super()._run(verb, key, fn, nbytes)
        if nbytes:
            with self._lock:
                self.bytes_by_key[key] += nbytes
        return result

    def mark(self) -> Counter[str]:
        with self._lock:
            return Counter(self.bytes_by_key)

    def since(self, mark: Counter[str]) -> dict[str, int]:
        with self._lock:
            return {k: v - mark[k] for k, v in self.bytes_by_key.items() if v - mark[k]}


def _chunk_bytes(put: dict[str, int]) -> int:
    return sum(v for k, v in put.items() if k.startswith("chunks/"))


def _mlp(layers: int, width: int) -> torch.nn.Sequential:
    torch.manual_seed(0)
    return torch.nn.Sequential(*[torch.nn.Linear(width, width) for _ in range(layers)])


CONFIGS = {
    # 10 x 256 KiB layers, 64 KiB chunks: each weight has 4 chunks, biases are packed
    "small-chunks": (256, TransferConfig(chunk_size=64 * KiB, pack_threshold=16 * KiB)),
    # 10 x 4 MiB layers with the default config: each weight is one chunk of its own
    "default": (1024, TransferConfig()),
}


@pytest.mark.parametrize("config", list(CONFIGS))
def test_saving_the_same_state_twice_uploads_no_chunk(config, capsys):
    width, transfer = CONFIGS[config]
    model = _mlp(10, width)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    store = CountingStorage(MemoryStorage())
    mgr = CheckpointManager(store, transfer=transfer)

    first = store.mark()
    info1 = mgr.save({"model": model, "opt": opt}, step=1)
    put1 = store.since(first)
    second = store.mark()
    info2 = mgr.save({"model": model, "opt": opt}, step=2)
    put2 = store.since(second)
    assert _chunk_bytes(put1) >= sum(p.numel() * 4 for p in model.parameters())
    assert _chunk_bytes(put2) == 0, {k: v for k, v in put2.items() if k.startswith("chunks/")}
    assert set(put2) == {info2.name, LATEST_POINTER, STATE_KEY}
    assert info2.stats.bytes_uploaded == 0 and info2.stats.bytes_reused == info1.stats.bytes_uploaded

    # A restarted job (a new manager: nothing cached) deduplicates against what is stored too.
    third = store.mark()
    CheckpointManager(store, transfer=transfer).save({"model": model, "opt": opt}, step=3)
    put3 = store.since(third)
    assert _chunk_bytes(put3) == 0
    with capsys.disabled():
        print(f"\n[dedup {config}] save 1: {_chunk_bytes(put1)} chunk bytes; save 2 (same state): "
              f"{_chunk_bytes(put2)} chunk + {sum(put2.values())} other bytes; "
              f"save 3 (new manager): {_chunk_bytes(put3)} chunk bytes")


@pytest.mark.parametrize("config", list(CONFIGS))
def test_changing_one_layer_reuploads_about_that_layer(config, capsys):
    width, transfer = CONFIGS[config]
    model = _mlp(10, width)
    store = CountingStorage(MemoryStorage())
    mgr = CheckpointManager(store, transfer=transfer)
    mgr.save({"model": model}, step=1)
    total = sum(p.numel() * p.element_size() for p in model.parameters())

    layer = model[5]
    with torch.no_grad():
        layer.weight.add_(1.0)
        layer.bias.add_(1.0)
    share = sum(p.numel() * p.element_size() for p in layer.parameters())
    mark = store.mark()
    info = mgr.save({"model": model}, step=2)
    uploaded = _chunk_bytes(store.since(mark))
    assert share <= uploaded < 2 * share, (uploaded, share)
    assert info.stats.bytes_uploaded == uploaded
    with capsys.disabled():
        print(f"\n[dedup {config}] model {total} bytes, changed layer {share} bytes: save 2 uploaded "
              f"{uploaded} chunk bytes ({uploaded / share:.2f}x the layer, {uploaded / total:.1%} of the model)")
