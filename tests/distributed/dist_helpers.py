"""Launch N gloo ranks on localhost and collect their JSON results.

One launcher process runs the worker (dist_worker.py, elastic_worker.py) and forks the ranks.

Shared by the tests and the worker: the deterministic states both sides rebuild.
"""

from __future__ import annotations

import datetime
import importlib
import json
import os
import socket
import subprocess
import sys
import tempfile
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

    One launcher process imports the worker (torch, torch.distributed, cloudckpt: seconds) and
    forks the ranks, each a separate process with its own gloo connections (worker_main).
    Raises AssertionError, with the ranks' output, on a hang or when a rank not in
    ``may_die`` wrote no result (those that may die and did give None).
    """
    out = Path(tempfile.mkdtemp(prefix=f"cloudckpt-{scenario}-"))
    env = {
        **os.environ,
        "WORLD_SIZE": str(world_size),
        "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()),
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
        "OMP_NUM_THREADS": "1",
    }
    env.pop("RANK", None)
    with open(out / "launcher.log", "w") as log:
        launcher = subprocess.Popen([sys.executable, str(worker), scenario, json.dumps(args), str(out)],
                                    env=env, stdout=log, stderr=subprocess.STDOUT, cwd=out, start_new_session=True)
    try:
        launcher.wait(timeout=timeout)
        hung = False
    except subprocess.TimeoutExpired:
        hung = True
    if hung or launcher.returncode != 0:
        try:
            os.killpg(launcher.pid, 9)  # the launcher and every rank it forked
        except ProcessLookupError:
            pass
        launcher.wait()
    results = []
    for rank in range(world_size):
        path = out / f"rank{rank}.json"
        if not hung and not path.exists() and rank in may_die:
            results.append(None)
            continue
        if hung or not path.exists():
            raise AssertionError(f"{scenario}: {'timed out' if hung else f'rank {rank} wrote no result'}\n"
                                 f"{_logs(out, world_size)}")
        results.append(json.loads(path.read_text()))
    return results


def _logs(out: Path, world_size: int) -> str:
    def tail(name: str) -> str:
        path = out / name
        return path.read_text()[-4000:] if path.exists() else "(none)"

    ranks = [f"--- rank {r} (exit {tail(f'rank{r}.exit')}) ---\n{tail(f'rank{r}.log')}" for r in range(world_size)]
    return "\n".join([f"--- launcher ---\n{tail('launcher.log')}", *ranks])


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
    """A worker's main: ``SCENARIO ARGS_JSON OUT_DIR``; WORLD_SIZE, MASTER_ADDR/PORT from the environment.

    Called once the worker's imports are done, it forks one process per rank (so the ranks
    share the import, not a process) and exits when they all have; each rank's exit status goes
    to OUT_DIR/rank<N>.exit and its output to OUT_DIR/rank<N>.log.
    """
    scenario, args, out_dir = sys.argv[1], json.loads(sys.argv[2]), Path(sys.argv[3])
    world = int(os.environ["WORLD_SIZE"])
    importlib.import_module("torch._dynamo")  # DTensor and fully_shard import it on first use: seconds
    url = args.get("url", "")
    if url.startswith(("s3://", "gs://")):  # the SDK, once for all ranks
        importlib.import_module("cloudckpt.storage.s3" if url.startswith("s3://") else "cloudckpt.storage.gcs")
    sys.stdout.flush()
    sys.stderr.flush()
    ranks = {}
    for rank in range(world):
        pid = os.fork()
        if pid == 0:
            try:
                log = os.open(out_dir / f"rank{rank}.log", os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
                os.dup2(log, 1)
                os.dup2(log, 2)
                os.environ["RANK"] = str(rank)
                _run_rank(scenarios[scenario], rank, world, args, out_dir)  # ends the process
            finally:
                traceback.print_exc()
                os._exit(1)  # a rank never returns into the launcher's loop
        ranks[pid] = rank
    while ranks:
        pid, status = os.wait()
        (out_dir / f"rank{ranks.pop(pid)}.exit").write_text(str(os.waitstatus_to_exitcode(status)))
    os._exit(0)


def _run_rank(scenario: Callable[[int, int, dict[str, Any]], dict[str, Any]], rank: int, world: int,
              args: dict[str, Any], out_dir: Path) -> None:
    """One rank: join the gloo group, run the scenario, write its result (or its unexpected exception)."""
    import torch.distributed as dist

    try:
        dist.init_process_group("gloo", rank=rank, world_size=world,
                                init_method=f"tcp://{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}",
                                timeout=datetime.timedelta(seconds=args.get("pg_timeout", 60)))
        result = scenario(rank, world, args)
    except BaseException as exc:  # noqa: BLE001
        result = {"unexpected": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()[-3000:]}
    (out_dir / f"rank{rank}.json").write_text(json.dumps(result, default=str))
    if "unexpected" not in result and not args.get("crash"):
        dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # no atexit / gloo teardown that could wait on a dead peer
