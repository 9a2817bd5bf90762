"""How DistributedCheckpointManager scales with the number of ranks (reported in docs/SCALING.md).

    python benchmarks/scaling.py --real       # 1, 2, 4, 8 gloo processes on S3 (moto), measured
    python benchmarks/scaling.py --simulate   # the commit path at 64, 1,024, 8,192 ranks (scaling_sim.py)
    python benchmarks/scaling.py              # both; --json FILE also writes the raw figures

Real: every world size saves and restores the same FSDP2-sharded model (8
Linear(512, 512) layers with Adam: 25 MB of state) on one moto S3 server;
per rank it reports requests, bytes, save and restore time, and rank 0's extra
Python memory over the other ranks (what the commit holds).  On this machine
(2 cores) the ranks share the CPUs, so times grow with the rank count for
reasons a cluster does not have; requests and bytes per rank are the figures
that carry over.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE.parent / "tests"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_world(world: int, url: str, endpoint: str, width: int = 512, layers: int = 8) -> list[dict[str, Any]]:
    out = Path(tempfile.mkdtemp(prefix=f"cloudckpt-scaling-{world}-"))
    port = _free_port()
    args = json.dumps({"url": url, "endpoint_url": endpoint, "width": width, "layers": layers})
    procs = []
    for rank in range(world):
        env = {**os.environ, "RANK": str(rank), "WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1",
               "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1",
               "PYTHONPATH": os.pathsep.join([str(HERE.parent), os.environ.get("PYTHONPATH", "")])}
        log = open(out / f"rank{rank}.log", "w")  # noqa: SIM115
        procs.append(subprocess.Popen([sys.executable, str(HERE / "scaling_rank.py"), args, str(out)], env=env,
                                      stdout=log, stderr=subprocess.STDOUT))
    for proc in procs:
        proc.wait(timeout=900)
    results = []
    for rank in range(world):
        path = out / f"rank{rank}.json"
        if not path.exists():
            raise RuntimeError(f"rank {rank} of {world} failed:\n{(out / f'rank{rank}.log').read_text()[-3000:]}")
        results.append(json.loads(path.read_text()))
    return results


def real(worlds: tuple[int, ...] = (1, 2, 4, 8)) -> list[dict[str, Any]]:
    from servers import MotoS3

    server = MotoS3()
    rows = []
    try:
        for world in worlds:
            url = f"s3://{server.new_bucket()}/run"
            ranks = run_world(world, url, server.endpoint_url)
            assert all(r["restored_equal"] for r in ranks), ranks
            others = [r["save_python_peak_bytes"] for r in ranks[1:]] or [0]
            rows.append({
                "ranks": world,
                "commit_seconds": ranks[0]["save_seconds"],
                "restore_seconds": max(r["restore_seconds"] for r in ranks),
                "put_bytes_per_rank": sum(r["save"]["bytes_put"] for r in ranks) / world,
                "save_requests_per_rank": sum(sum(r["save"]["requests"].values()) for r in ranks) / world,
                "restore_requests_per_rank": sum(sum(r["restore"]["requests"].values()) for r in ranks) / world,
                "restore_bytes_per_rank": sum(r["restore"]["bytes_read"] for r in ranks) / world,
                "parts_read_per_rank": sum(r["restore_parts_read"] for r in ranks) / world,
                "rank0_extra_python_bytes": ranks[0]["save_python_peak_bytes"] - max(others),
                "rank0_save_requests": ranks[0]["save"]["requests"],
            })
            print(_line(rows[-1]), flush=True)
    finally:
        server.stop()
    return rows


def _line(row: dict[str, Any]) -> str:
    return "  ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--real", action="store_true")
    parser.add_argument("--simulate", action="store_true")
    parser.add_argument("--json", type=Path)
    options = parser.parse_args()
    both = not options.real and not options.simulate
    report: dict[str, Any] = {}
    if options.real or both:
        print("real gloo processes on S3 (moto):")
        report["real"] = real()
    if options.simulate or both:
        import scaling_sim

        start = time.perf_counter()
        report["simulated"] = scaling_sim.simulate()
        print(f"simulated commit path ({time.perf_counter() - start:.0f} s):")
        for row in report["simulated"]["commit"]:
            print("  " + _line(row))
        for row in report["simulated"]["per_rank"]:
            print("  " + _line(row))
    if options.json:
        options.json.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
