"""One rank of ``benchmarks/scaling.py --real``: save and restore an FSDP2-sharded state on S3, measured.

``python scaling_rank.py ARGS_JSON OUT_DIR`` with RANK, WORLD_SIZE, MASTER_ADDR/PORT set.
The global state is the same at every world size (so each rank holds 1/N of it).
"""

from __future__ import annotations

import datetime
import json
import os
import sys
import time
import tracemalloc
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist


def build(world: int, width: int, layers: int) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(width, width) for _ in range(layers)])
    mesh = init_device_mesh("cpu", (world,))
    for layer in model:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    model(torch.randn(4, width)).sum().backward()
    optimizer.step()
    return model, optimizer


class _Counted:
    """Counts the requests and bytes a rank sends to its store."""

    def __init__(self, store: Any) -> None:
        from cloudckpt.storage.faults import FaultyStorage

        self.store = FaultyStorage(store)
        self.bytes_read = 0
        inner_get = self.store.get

        def get(key: str, *args: Any, **kwargs: Any) -> Any:
            data = inner_get(key, *args, **kwargs)
            self.bytes_read += len(data)
            return data

        self.store.get = get  # type: ignore[method-assign]

    def snapshot(self) -> dict[str, Any]:
        return {"requests": dict(self.store.counts), "bytes_put": self.store.bytes_put, "bytes_read": self.bytes_read}


def main() -> None:
    from cloudckpt.distributed import DistributedCheckpointManager
    from cloudckpt.storage import open_storage

    args, out = json.loads(sys.argv[1]), Path(sys.argv[2])
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=120),
                            init_method=f"tcp://{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}")
    counted = _Counted(open_storage(args["url"], endpoint_url=args["endpoint_url"]))
    model, optimizer = build(world, args["width"], args["layers"])
    mgr = DistributedCheckpointManager(counted.store)
    state = {"model": model, "optimizer": optimizer}
    dist.barrier()
    tracemalloc.start()
    start = time.perf_counter()
    mgr.save(state, step=1)
    save_seconds = time.perf_counter() - start
    _, save_peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    saved = counted.snapshot()
    fresh, fresh_opt = build(world, args["width"], args["layers"])
    dist.barrier()
    start = time.perf_counter()
    mgr.restore({"model": fresh, "optimizer": fresh_opt})
    restore_seconds = time.perf_counter() - start
    restored = counted.snapshot()
    same = all(torch.equal(a.to_local(), b.to_local()) for a, b in zip(model.parameters(), fresh.parameters()))
    result = {"rank": rank, "save_seconds": save_seconds, "restore_seconds": restore_seconds,
              "save_python_peak_bytes": save_peak, "save": saved, "restore_parts_read": mgr.parts_read,
              "restore": {k: (v - saved[k] if not isinstance(v, dict) else
                              {verb: n - saved[k].get(verb, 0) for verb, n in v.items()})
                          for k, v in restored.items()},
              "restored_equal": same}
    (out / f"rank{rank}.json").write_text(json.dumps(result))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
