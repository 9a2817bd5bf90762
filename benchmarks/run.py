"""cloudckpt against the tools users would otherwise pick; every figure is a ratio from one run.

    python benchmarks/run.py              # the full run (states up to ~1 GiB)
    python benchmarks/run.py --quick      # CI's smoke run: tiny states, one repeat, asserts nothing
    python benchmarks/run.py --cases local,s3 --repeats 5
    python benchmarks/run.py --big        # adds the opt-in 4 GiB case

Cases (``--cases``, comma-separated; see benchmarks/suite/):
  local        full saves into fresh directories and restores: cloudckpt, torch.save / torch.load
               (also mmap=True), safetensors (weights only), DCP FileSystemWriter / Reader; fsync on all
  s3           the same through moto and a latency proxy (10 ms one way, 25 MB/s per connection), each in
               its own process: cloudckpt, s3torchconnector S3Checkpoint and DCP S3StorageWriter / Reader,
               DCP FsspecWriter / Reader on s3fs, and the raw ceiling; with range-honest and stock moto
  requests     S3 requests per steady-state save with retention on
  blocking     the time a save blocks training, against a plain torch copy into preallocated buffers
  incremental  saves into one root after real optimizer steps (full training, and fine-tuning)
  training     slowdown of a training loop that saves every K steps
  memory       peak extra resident memory during async saves
  growth       cloudckpt alone at every size (with --big, 4 GiB too): save/restore time per GiB and peak memory

Peers are optional (``pip install -e '.[bench]'``); one that cannot run is listed with the reason.
Client CPU is ``getrusage`` of this process; server CPU is moto's process, read from /proc.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import sys
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]

from suite import local_cases, report, s3_cases  # noqa: E402
from suite.harness import Bench  # noqa: E402
from suite.s3env import S3Env  # noqa: E402

CASES = ("local", "s3", "requests", "blocking", "incremental", "training", "memory", "growth")


def run_case(bench: Bench, case: str) -> None:
    a = bench.args
    if case == "local":
        for size in a.sizes:
            bench.ratio_targets(local_cases.run_local(bench, size))
    elif case == "s3":
        for size in a.sizes:
            for honest in (True, False) if size == a.sizes[0] and not a.quick else (True,):
                bench.ratio_targets(s3_cases.run_s3(bench, size, honest_ranges=honest))
    elif case == "requests":
        s3_cases.run_requests(bench, a.small_mib)
    elif case == "blocking":
        local_cases.run_blocking(bench, a.sizes[-1])
    elif case == "incremental":
        local_cases.run_incremental(bench, a.sizes[0], finetune=False)
        local_cases.run_incremental(bench, a.sizes[0], finetune=True)
    elif case == "training":
        local_cases.run_training(bench, a.small_mib)
    elif case == "memory":
        local_cases.run_memory(bench, a.sizes[-1])
    elif case == "growth":
        local_cases.run_growth(bench, a.sizes, lambda: S3Env(link_mbps=a.link_mbps))


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="cloudckpt benchmarks (ratios against in-run peers)")
    parser.add_argument("--quick", action="store_true", help="tiny states, one repeat: CI's smoke run")
    parser.add_argument("--big", action="store_true", help="add the 4 GiB state (needs ~20 GiB of memory)")
    parser.add_argument("--sizes", default="256,1024", help="state sizes in MiB, comma-separated")
    parser.add_argument("--small-mib", type=float, default=64, help="state size of the requests and training cases")
    parser.add_argument("--cases", default=",".join(CASES))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--connections", type=int, default=16, help="connections of the raw S3 ceiling")
    parser.add_argument("--link-mbps", type=float, default=25.0, help="per-connection cap of the proxy, MB/s")
    parser.add_argument("--fsspec-max-mib", type=float, default=300, help="largest state DCP-on-s3fs runs")
    parser.add_argument("--train-steps", type=int, default=40)
    parser.add_argument("--train-every", type=int, default=10, help="checkpoint every K steps")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--tmp", default=None, help="directory for checkpoints written by the run")
    args = parser.parse_args(argv)
    args.sizes = [float(s) for s in args.sizes.split(",") if s.strip()]
    if args.quick:
        args.sizes, args.small_mib, args.repeats, args.fsspec_max_mib = [8], 4, 1, 0
        args.train_steps, args.train_every = 2, 1
    if args.big:
        args.sizes.append(4096)
    unknown = [c for c in args.cases.split(",") if c.strip() and c.strip() not in CASES]
    if unknown:
        parser.error(f"unknown case(s) {unknown}; choose from {', '.join(CASES)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    for noisy in ("cloudckpt", "botocore", "urllib3", "werkzeug", "s3fs", "torch", "s3torchconnector"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message="torch.distributed is disabled")
    bench = Bench(args)
    try:
        for case in (c.strip() for c in args.cases.split(",") if c.strip()):
            logging.info("running %s ...", case)
            run_case(bench, case)
    finally:
        shutil.rmtree(bench.workdir, ignore_errors=True)
    report.print_tables(bench)
    print(f"\nwrote {report.write(bench, args.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
