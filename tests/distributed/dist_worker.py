"""One rank of a distributed test: ``python dist_worker.py SCENARIO ARGS_JSON OUT_DIR`` (dist_helpers.worker_main)."""

from __future__ import annotations

import os
import time
import traceback
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from dist_helpers import SMALL_CHUNKS, dcp_full_state, rank_shard, replicated_model, worker_main

from cloudckpt.distributed import (
    DistributedCheckpointError,
    DistributedCheckpointManager,
)
from cloudckpt.integrations.dcp import CloudStorageReader, CloudStorageWriter
from cloudckpt.storage import open_storage
from cloudckpt.storage.faults import Fault, FaultyStorage


def _store(args: dict[str, Any], url: str | None = None, faulty: bool = False):
    store = open_storage(url or args["url"], **args.get("options", {}))
    return FaultyStorage(store, [Fault("put", kind="permanent", key_prefix="chunks/", times=10**9)]) if faulty else store


def _sharded(full: dict[str, Any], mesh, layout: str) -> dict[str, Any]:
    from torch.distributed.tensor import Shard, distribute_tensor

    first, second = (Shard(0), Shard(1)) if layout == "rows" else (Shard(1), Shard(0))
    return {
        "w": distribute_tensor(full["w"], mesh, [first]),
        "emb": distribute_tensor(full["emb"], mesh, [second]),
        "big": distribute_tensor(full["big"], mesh, [first]),
        "bias": full["bias"].clone(),
        "step": full["step"],
    }


def _zeros_like(full: dict[str, Any]) -> dict[str, Any]:
    return {k: torch.zeros_like(v) if isinstance(v, torch.Tensor) else 0 for k, v in full.items()}


def _compare(loaded: dict[str, Any], full: dict[str, Any]) -> dict[str, bool]:
    """Each entry equal to the global value (DTensors gathered: a collective)."""
    from torch.distributed.tensor import DTensor

    result = {}
    for key, expected in full.items():
        value = loaded[key]
        if isinstance(value, DTensor):
            value = value.full_tensor()
        result[key] = bool(torch.equal(value, expected)) if isinstance(expected, torch.Tensor) else value == expected
    return result


def dcp_save(rank: int, world: int, args: dict[str, Any]) -> dict[str, Any]:
    """Save a row-sharded state (sync, and async to a second location), reload it column-sharded."""
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (world,))
    full = dcp_full_state()
    state = _sharded(full, mesh, "rows")
    writer = CloudStorageWriter(args["url"], storage_options=args.get("options"), transfer=SMALL_CHUNKS)
    dcp.save(state, storage_writer=writer)
    out: dict[str, Any] = {}
    if args.get("async_url"):
        future = dcp.async_save(state, storage_writer=CloudStorageWriter(
            args["async_url"], storage_options=args.get("options"), transfer=SMALL_CHUNKS))
        future.result(timeout=60)
        out["async_done"] = True
    target = _sharded(_zeros_like(full), mesh, "columns")
    reader = CloudStorageReader(args["url"], storage_options=args.get("options"), allow_pickle="weights_only")
    dcp.load(target, storage_reader=reader)
    out["resharded_equal"] = _compare(target, full)
    out["local_w_shape"] = list(target["w"].to_local().shape)
    return out


def dcp_load(rank: int, world: int, args: dict[str, Any]) -> dict[str, Any]:
    """Load a checkpoint saved by one process into row- and column-sharded DTensors."""
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (world,))
    full = dcp_full_state()
    out = {}
    for layout in ("rows", "columns"):
        target = _sharded(_zeros_like(full), mesh, layout)
        dcp.load(target, storage_reader=CloudStorageReader(args["url"], storage_options=args.get("options"),
                                                           allow_pickle="weights_only"))
        out[layout] = _compare(target, full)
        out[f"{layout}_local_w_shape"] = list(target["w"].to_local().shape)
    return out


def dcp_rank_failure(rank: int, world: int, args: dict[str, Any]) -> dict[str, Any]:
    """Rank ``fail_rank`` cannot store chunks (permanent fault): every rank must get an error, fast."""
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (world,))
    state = _sharded(dcp_full_state(), mesh, "rows")
    writer = CloudStorageWriter(_store(args, faulty=rank == args["fail_rank"]), transfer=SMALL_CHUNKS)
    start = time.monotonic()
    try:
        dcp.save(state, storage_writer=writer)
    except BaseException as exc:  # DCP raises CheckpointException, a BaseException  # noqa: BLE001
        failures = getattr(exc, "failures", {})
        return {"error": type(exc).__name__, "failed_ranks": sorted(failures),
                "causes": sorted({type(e[0]).__name__ for e in failures.values()}),
                "seconds": time.monotonic() - start}
    return {"error": None}


def manager_roundtrip(rank: int, world: int, args: dict[str, Any]) -> dict[str, Any]:
    """Two collective saves (model replicated, shard per rank), then restores into fresh objects."""
    model, optimizer = replicated_model()
    mgr = DistributedCheckpointManager(_store(args), replicated=["model"], transfer=SMALL_CHUNKS,
                                       monitor="loss", mode="min")
    torch.manual_seed(7 + rank)
    shard = rank_shard(rank, 1)
    first = mgr.save({"model": model, "optimizer": optimizer, "shard": shard, "progress": {"rank": rank, "seen": 10}},
                     step=10, metrics={"loss": 0.5})
    after_first = torch.rand(4)
    second = mgr.save({"model": model, "optimizer": optimizer, "shard": rank_shard(rank, 2),
                       "progress": {"rank": rank, "seen": 20}}, step=20, metrics={"loss": 0.7})
    fresh = torch.nn.Linear(16, 8)
    fresh_opt = torch.optim.SGD(fresh.parameters(), lr=0.1, momentum=0.9)
    target = {"model": fresh, "optimizer": fresh_opt, "shard": torch.zeros(3000), "progress": {}}
    latest = mgr.restore(target)
    out = {
        "first": [first.name, list(first.pointers)], "second_stats": second.stats.__dict__,
        "latest_step": latest.step,
        "latest_ok": {
            "model": all(torch.equal(a, b) for a, b in zip(fresh.parameters(), model.parameters())),
            "momentum": torch.equal(fresh_opt.state_dict()["state"][0]["momentum_buffer"],
                                    optimizer.state_dict()["state"][0]["momentum_buffer"]),
            "shard": torch.equal(target["shard"], rank_shard(rank, 2)),
            "progress": target["progress"] == {"rank": rank, "seen": 20},
        },
    }
    best = mgr.restore(target, "best")
    out["best_step"] = best.step
    out["best_ok"] = {"shard": torch.equal(target["shard"], shard), "progress": target["progress"]["seen"] == 10,
                      "rng": torch.equal(torch.rand(4), after_first)}
    mgr.close()
    return out


def manager_rank_failure(rank: int, world: int, args: dict[str, Any]) -> dict[str, Any]:
    """A good save, then one where ``fail_rank`` cannot upload (or, with ``crash``, dies), then a good one again."""
    store = _store(args)
    faulty = FaultyStorage(store)
    mgr = DistributedCheckpointManager(faulty, transfer=SMALL_CHUNKS)
    mgr.save({"shard": rank_shard(rank, 1)}, step=1)
    if rank == args["fail_rank"]:
        if args.get("crash"):
            os._exit(3)  # dies without a word: the others must give up at the process group timeout
        faulty.faults.append(Fault("put", kind="permanent", key_prefix="chunks/", times=10**9))
    start = time.monotonic()
    out: dict[str, Any] = {}
    try:
        mgr.save({"shard": rank_shard(rank, 2)}, step=2)
        out["error"] = None
    except DistributedCheckpointError as exc:
        out.update(error="DistributedCheckpointError", failed_ranks=sorted(exc.failures),
                   cause=type(exc.__cause__).__name__ if exc.__cause__ else None, message=str(exc)[:500])
    except BaseException as exc:  # e.g. gloo's error when a peer died  # noqa: BLE001
        out.update(error=type(exc).__name__, message=str(exc)[:500])
    out["seconds"] = time.monotonic() - start
    if args.get("crash"):
        return out
    out["latest_after_failure"] = mgr.latest().step
    faulty.faults.clear()
    out["third"] = mgr.save({"shard": rank_shard(rank, 3)}, step=3).step
    mgr.close()
    return out


def _sequence(**parts):
    """A scenario running several parts in one process group (each part's args under its name)."""

    def run(rank: int, world: int, args: dict[str, Any]) -> dict[str, Any]:
        out = {}
        for name, part in parts.items():
            if name in args:
                try:
                    out[name] = part(rank, world, args[name])
                except BaseException as exc:  # noqa: BLE001
                    out[name] = {"unexpected": f"{type(exc).__name__}: {exc}",
                                 "traceback": traceback.format_exc()[-3000:]}
        return out

    return run


SCENARIOS = {
    # Several parts per launch: starting two interpreters with torch costs more than the tests.
    "dcp": _sequence(load=dcp_load, save=dcp_save, failure=dcp_rank_failure),
    "manager": _sequence(roundtrip=manager_roundtrip, failure=manager_rank_failure),
    "manager_crash": manager_rank_failure,
}


if __name__ == "__main__":
    worker_main(SCENARIOS)
