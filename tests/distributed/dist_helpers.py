"""Launch N gloo ranks on localhost as subprocesses (dist_worker.py) and collect their JSON results.

Shared by the tests and the worker: the deterministic states both sides rebuild.
"""

from __future__ import annotations

import datetime
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

import cloudckpt
from cloudckpt.transfer import TransferConfig

REPO = Path(cloudckpt.__file__).resolve().parent.parent
WORKER = Path(__file__).with_name("dist_worker.py")
#: Small chunks, so that a few-KB test state still packs small tensors and splits a large one.
SMALL_CHUNKS = TransferConfig(chunk_size=64 * 1024, pack_threshold=4 * 1024, pack_size=16 * 1024, concurrency=4)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(scenario: str, args: dict[str, Any], world_size: int = 2, timeout: float = 150,
              may_die: tuple[int, ...] = (), worker: Path = WORKER) -> list[dict[str, Any] | None]:
    """Run ``scenario`` on ``world_size`` ranks; return each rank's result.

    Raises AssertionError, with the ranks' output, on a hang or when a rank not in
    ``may_die`` wrote no result (those that may die and did give None).
    """
    out = Path(tempfile.mkdtemp(prefix=f"cloudckpt-{scenario}-"))
    port = free_port()
    procs = []
    for rank in range(world_size):
        env = {
            **os.environ,
            "RANK": str(rank), "WORLD_SIZE": str(world_size),
            "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
            "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
            "OMP_NUM_THREADS": "1",
        }
        log = open(out / f"rank{rank}.log", "w")  # noqa: SIM115 (the child keeps it)
        procs.append(subprocess.Popen([sys.executable, str(worker), scenario, json.dumps(args), str(out)],
                                      env=env, stdout=log, stderr=subprocess.STDOUT, cwd=out))
        log.close()
    deadline = time.monotonic() + timeout
    hung = False
    for proc in procs:
        try:
            proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            hung = True
    if hung:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    results = []
    for rank, proc in enumerate(procs):
        path = out / f"rank{rank}.json"
        if not hung and not path.exists() and rank in may_die:
            results.append(None)
            continue
        if hung or not path.exists():
            logs = "\n".join(f"--- rank {r} (exit {p.returncode}) ---\n{(out / f'rank{r}.log').read_text()[-4000:]}"
                             for r, p in enumerate(procs))
            raise AssertionError(f"{scenario}: {'timed out' if hung else f'rank {rank} wrote no result'}\n{logs}")
        results.append(json.loads(path.read_text()))
    return results


def dcp_full_state() -> dict[str, Any]:
    """The global (unsharded) state the DCP tests save and compare against."""
    g = torch.Generator().manual_seed(1234)
    return {
        "w": torch.randn(8, 6, generator=g),
        "emb": torch.randn(5, 4, generator=g).to(torch.bfloat16),
        "big": torch.randn(400, 100, generator=g),  # 160 KB: two shards of 80 KB, each cut in two chunks
        "bias": torch.arange(7, dtype=torch.int64),
        "step": 7,
    }


def rank_shard(rank: int, version: int) -> torch.Tensor:
    """Per-rank state for the manager tests (differs by rank and by save)."""
    g = torch.Generator().manual_seed(1000 * version + rank)
    return torch.randn(3000, generator=g)  # 12 KB


def replicated_model() -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """The same model and optimizer (one SGD step taken: momentum buffers exist) on every rank."""
    g = torch.Generator().manual_seed(42)
    model = torch.nn.Linear(16, 8)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(4, 16, generator=g)).sum().backward()
    optimizer.step()
    return model, optimizer


def worker_main(scenarios: dict[str, Callable[[int, int, dict[str, Any]], dict[str, Any]]]) -> None:
    """A worker's main: ``SCENARIO ARGS_JSON OUT_DIR``; RANK, WORLD_SIZE, MASTER_ADDR/PORT from the environment.

    The scenario's result (JSON) goes to OUT_DIR/rank<N>.json; an unexpected
    exception is recorded there too, so the test sees it.
    """
    import torch.distributed as dist

    scenario, args, out_dir = sys.argv[1], json.loads(sys.argv[2]), Path(sys.argv[3])
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    dist.init_process_group("gloo", rank=rank, world_size=world,
                            init_method=f"tcp://{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}",
                            timeout=datetime.timedelta(seconds=args.get("pg_timeout", 60)))
    try:
        result = scenarios[scenario](rank, world, args)
    except BaseException as exc:  # noqa: BLE001
        result = {"unexpected": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()[-3000:]}
    (out_dir / f"rank{rank}.json").write_text(json.dumps(result, default=str))
    if "unexpected" not in result and not args.get("crash"):
        dist.destroy_process_group()
    sys.stdout.flush()
    os._exit(0)  # no atexit / gloo teardown that could wait on a dead peer
