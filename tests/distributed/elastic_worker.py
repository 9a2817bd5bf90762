"""One rank of an elastic test: ``python elastic_worker.py SCENARIO ARGS_JSON OUT_DIR`` (see dist_worker.py).

A small FSDP2 model (``fully_shard`` on a CPU mesh, gloo) with Adam, trained on
random batches drawn from each rank's global RNG, so that a run that restores
every rank's RNG continues bit for bit.  ``fingerprint`` is the SHA-256 of the
full (gathered) parameters and optimizer moments: equal fingerprints at
different world sizes mean the same state.
"""

from __future__ import annotations

import hashlib
import os
import signal
import time
from typing import Any

import torch
import torch.distributed as dist
from dist_helpers import SMALL_CHUNKS, worker_main

from cloudckpt.distributed import DistributedCheckpointError, DistributedCheckpointManager
from cloudckpt.storage import Storage, open_storage
from cloudckpt.storage.faults import Fault, FaultyStorage


def build(world: int) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """The same model on every world size: 12 and 5 output rows, so 4 and 3 ranks shard unevenly."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)  # same initial weights everywhere
    model = torch.nn.Sequential(torch.nn.Linear(16, 12), torch.nn.Tanh(), torch.nn.Linear(12, 5))
    mesh = init_device_mesh("cpu", (world,))
    for layer in (model[0], model[2]):
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model, torch.optim.Adam(model.parameters(), lr=0.05)


def train(model: torch.nn.Module, optimizer: torch.optim.Optimizer, steps: int) -> None:
    for _ in range(steps):
        x = torch.randn(8, 16)  # this rank's batch, from its RNG
        loss = model(x).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


def fingerprint(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> str:
    """SHA-256 of every full parameter and Adam moment, in parameter order (a collective)."""
    digest = hashlib.sha256()
    for name, param in model.named_parameters():
        tensors = [param] + [optimizer.state[param][k] for k in ("exp_avg", "exp_avg_sq") if param in optimizer.state]
        for t in tensors:
            full = t.full_tensor() if hasattr(t, "full_tensor") else t
            digest.update(name.encode() + full.detach().contiguous().numpy().tobytes())
    return digest.hexdigest()


def _store(args: dict[str, Any]) -> Storage:
    return open_storage(args["url"], **args.get("options", {}))


def _manager(store: Storage, args: dict[str, Any]) -> DistributedCheckpointManager:
    return DistributedCheckpointManager(store, replicated=["progress"], transfer=SMALL_CHUNKS,
                                        monitor="loss", mode="min")


class _KillOnChunkPut(FaultyStorage):
    """SIGKILLs its own process when it is about to store a chunk: a rank that dies mid-save."""

    def put(self, key: str, data: Any, **kwargs: Any) -> Any:
        if key.startswith("chunks/"):
            os.kill(os.getpid(), signal.SIGKILL)
        return super().put(key, data, **kwargs)


def save_run(rank: int, world: int, args: dict[str, Any]) -> dict[str, Any]:
    """Train 2 steps, save (step 2); a save where one rank cannot store (step 3); train 2, save (step 4)."""
    store = FaultyStorage(_store(args))
    mgr = _manager(store, args)
    model, optimizer = build(world)
    train(model, optimizer, 2)
    state = {"model": model, "optimizer": optimizer, "progress": {"step": 2, "seen": [2 * world]}}
    out: dict[str, Any] = {"saved": mgr.save(state, step=2, metrics={"loss": 1.0}).step,
                           "at_2": fingerprint(model, optimizer)}
    if rank == args["fail_rank"]:
        store.faults.append(Fault(None, kind="permanent", times=10**9))  # every request of this rank fails
    try:
        mgr.save(state, step=3)
        out["failed_save"] = None
    except DistributedCheckpointError as exc:
        out["failed_save"] = {"ranks": sorted(exc.failures), "message": str(exc)[:400]}
    store.faults.clear()
    out["latest_after_failure"] = mgr.latest().step
    train(model, optimizer, 2)
    state["progress"] = {"step": 4, "seen": [4 * world]}
    out["saved_4"] = mgr.save(state, step=4, metrics={"loss": 2.0}).step
    out["at_4"] = fingerprint(model, optimizer)
    return out


def restore_run(rank: int, world: int, args: dict[str, Any]) -> dict[str, Any]:
    """Restore ``which`` into a fresh model at this world size; optionally train and save, or die mid-save."""
    store = _store(args)
    if args.get("kill_rank") == rank:
        store = _KillOnChunkPut(store)
    mgr = _manager(store, args)
    model, optimizer = build(world)
    progress: dict[str, Any] = {}
    state = {"model": model, "optimizer": optimizer, "progress": progress}
    info = mgr.restore(state, args.get("which", "latest"))
    out: dict[str, Any] = {"step": info.step, "restored": fingerprint(model, optimizer), "progress": progress,
                           "parts_read": mgr.parts_read}
    if args.get("train"):
        train(model, optimizer, args["train"])
        out["trained"] = fingerprint(model, optimizer)
    if args.get("save_step") is not None:
        start = time.monotonic()
        try:
            state["progress"] = {"step": args["save_step"], "seen": [0]}
            out["saved"] = mgr.save(state, step=args["save_step"], metrics={"loss": 0.5}).step
        except BaseException as exc:  # a dead peer: gloo's error or the timeout  # noqa: BLE001
            out["save_error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
        out["save_seconds"] = time.monotonic() - start
        out["latest"] = mgr.latest().step
    dist.barrier() if args.get("kill_rank") is None else None
    return out


SCENARIOS = {"save": save_run, "restore": restore_run}

if __name__ == "__main__":
    worker_main(SCENARIOS)
