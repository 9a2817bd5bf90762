"""Restore throughput and peak extra memory of a large state, against a baseline checkout.

A model of ``--size-mib`` fp32 parameters is saved once to a local root.  Each
case then runs in its own process: build the live model, note the resident
memory, reset the peak (``/proc/self/clear_refs``), ``restore()`` into it, and
report the time and the peak resident memory above the level before the
restore ("peak extra").  The cases:

* ``baseline``: the code at ``--baseline`` (a checkout of main before issue 12,
  e.g. ``git archive d88acb4 | tar -x -C /tmp/base``), which writes chunks
  straight into the live tensors and checks them afterwards;
* ``mapped``: this checkout as a local root runs it: chunk files are memory-mapped,
  verified through the mapping and copied from it (no staging memory, one read);
* ``staged``: this checkout with the chunk files not lent, the path a restore from
  S3 or GCS takes, with ``staging_budget`` 256 MiB (the smallest default): a state
  above the budget is verified in a first pass and copied in by a second;
* ``staged-whole``: the same with a budget above the state: one read, all chunks
  held in staging until every one has verified.

    python benchmarks/restore_memory.py --baseline /tmp/base            # ~1 GiB state
    python benchmarks/restore_memory.py --size-mib 64 --repeats 1       # a quick look

Times are ratios against the baseline in the same run; the machine's other
load moves them, so compare within one run only.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MiB = 1024 * 1024
WIDTH = 4096  # one Linear(4096, 4096) holds 64 MiB of fp32 weights


def build_model(size_mib: int):
    import torch

    layers = max(1, round(size_mib * MiB / (WIDTH * WIDTH * 4)))
    width = WIDTH if size_mib >= 64 else max(8, int((size_mib * MiB / 4) ** 0.5))
    return torch.nn.Sequential(*[torch.nn.Linear(width, width, bias=False) for _ in range(layers)])


def _status_bytes(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def child_save(root: str, size_mib: int) -> None:
    import torch

    import cloudckpt

    torch.manual_seed(0)
    model = build_model(size_mib)
    cloudckpt.CheckpointManager(root, capture_rng=False).save({"model": model}, step=1)


def _staging_store(root: str):
    """A local root that lends no views, so the restore stages chunks as it does for S3 and GCS."""
    from cloudckpt.storage.local import LocalStorage

    class StagingLocalStorage(LocalStorage):
        def lend(self, key: str) -> None:
            return None

    return StagingLocalStorage(root)


def child_restore(root: str, size_mib: int, repeats: int, budget_mib: int | None, lend: bool) -> dict:
    import torch

    import cloudckpt

    store = root if lend else _staging_store(root)
    transfer = cloudckpt.TransferConfig() if budget_mib is None else \
        cloudckpt.TransferConfig(staging_budget=budget_mib * MiB)
    model = build_model(size_mib)
    nbytes = sum(p.numel() * p.element_size() for p in model.parameters())
    manager = cloudckpt.CheckpointManager(store, capture_rng=False, transfer=transfer)
    seconds, extra = [], []
    for _ in range(repeats):
        with torch.no_grad():
            for p in model.parameters():
                p.zero_()
        before = _status_bytes("VmRSS")
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        start = time.perf_counter()
        manager.restore({"model": model})
        seconds.append(time.perf_counter() - start)
        extra.append(_status_bytes("VmHWM") - before)
    torch.manual_seed(0)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(),
                                                  build_model(size_mib).state_dict().values()))
    return {"nbytes": nbytes, "seconds": seconds, "peak_extra": extra}


def run_case(code: Path, root: str, args: argparse.Namespace, budget_mib: int | None, *, lend: bool = True) -> dict:
    env = {**os.environ, "PYTHONPATH": str(code)}
    command = [sys.executable, __file__, "--child-restore", root, "--size-mib", str(args.size_mib),
               "--repeats", str(args.repeats)] + ([] if budget_mib is None else ["--budget-mib", str(budget_mib)])
    command += [] if lend else ["--no-lend"]
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=True, cwd=code)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-mib", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--baseline", type=Path, help="a checkout to compare with (e.g. main before issue 12)")
    parser.add_argument("--tmp", default=None, help="where the local root goes (default: the system temp dir)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--child-restore", help=argparse.SUPPRESS)
    parser.add_argument("--child-save", help=argparse.SUPPRESS)
    parser.add_argument("--budget-mib", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--no-lend", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child_save:
        child_save(args.child_save, args.size_mib)
        return
    if args.child_restore:
        print(json.dumps(child_restore(args.child_restore, args.size_mib, args.repeats, args.budget_mib, not args.no_lend)))
        return

    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
        root = str(Path(tmp) / "root")
        subprocess.run([sys.executable, __file__, "--child-save", root, "--size-mib", str(args.size_mib)],
                       env={**os.environ, "PYTHONPATH": str(ROOT)}, check=True)
        cases: dict[str, dict] = {}
        if args.baseline is not None:
            cases["baseline"] = run_case(args.baseline.resolve(), root, args, None)
        cases["mapped"] = run_case(ROOT, root, args, None)
        cases["staged"] = run_case(ROOT, root, args, 256, lend=False)
        cases["staged-whole"] = run_case(ROOT, root, args, 2 * args.size_mib + 64, lend=False)
    base = statistics.median(cases["baseline"]["seconds"]) if "baseline" in cases else None
    print(f"\nrestore of a {args.size_mib} MiB state from a local root, {args.repeats} runs each (median)")
    print(f"{'case':14} {'MiB/s':>8} {'vs baseline':>12} {'peak extra MiB':>15} {'extra / state':>14}")
    for name, row in cases.items():
        seconds = statistics.median(row["seconds"])
        extra = statistics.median(row["peak_extra"])
        ratio = f"{base / seconds:.2f}x" if base else "-"
        print(f"{name:14} {row['nbytes'] / MiB / seconds:8.0f} {ratio:>12} {extra / MiB:15.0f} "
              f"{extra / row['nbytes']:14.2f}")
    if args.json:
        args.json.write_text(json.dumps({"size_mib": args.size_mib, "cases": cases}, indent=1))


if __name__ == "__main__":
    main()
