"""Time from SIGTERM to a durable checkpoint and to process exit, for a state of a given size.

    python benchmarks/preemption_latency.py --size-mib 256            # local disk and S3 (moto)
    python benchmarks/preemption_latency.py --size-mib 256 --backends local

A child process trains a transformer-shaped model (params + AdamW state of
about ``--size-mib``) with ``CheckpointCallback(async_save=True,
preemption=True)`` and periodic saves; the parent sends it SIGTERM at a step
while a periodic save is still uploading, and measures from the signal to the
preemption checkpoint's commit (read from the child's report) and to the
child's exit (status 75 expected).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

_CHILD = r"""
import json, os, sys, time
sys.path[:0] = [sys.argv[4], os.path.join(sys.argv[4], "benchmarks")]
import torch, cloudckpt
from suite.workload import Workload

root, size_mib, report = sys.argv[1], int(sys.argv[2]), sys.argv[3]
options = json.loads(os.environ.get("BENCH_STORAGE_OPTIONS", "{}"))
work = Workload(size_mib)
model, optimizer, nbytes = work.model, work.optimizer, work.nbytes
data = [(torch.randn(2, work.dim),)] * 1000

class Report(cloudckpt.Callback):
    def on_step_end(self, trainer, step, logs):
        if step == 3:
            print("ready", flush=True)  # the parent signals now; a periodic save is in flight

callback = cloudckpt.CheckpointCallback(root, save_frequency=None, save_best=False, save_every_n_steps=3,
                                        async_save=True, preemption=True, storage_options=options or None)
loss = lambda m, b: m(b[0]).square().mean()
trainer = cloudckpt.Trainer(model, optimizer, data, loss, callbacks=[Report(), callback], max_epochs=1)
try:
    trainer.fit()
finally:
    latest = callback.manager.latest()
    with open(report, "w") as fh:
        json.dump({"committed": time.time(), "name": latest and latest.name, "reason": latest and latest.reason,
                   "nbytes": nbytes}, fh)
"""


def measure(root: str, size_mib: int, env: dict[str, str]) -> dict[str, float | str]:
    with tempfile.TemporaryDirectory() as tmp:
        report = os.path.join(tmp, "report.json")
        child = subprocess.Popen([sys.executable, "-c", _CHILD, root, str(size_mib), report, str(ROOT)],
                                 stdout=subprocess.PIPE, text=True, env={**os.environ, **env})
        assert child.stdout is not None
        for line in child.stdout:
            if line.strip() == "ready":
                break
        sent = time.time()
        child.send_signal(signal.SIGTERM)
        status = child.wait(timeout=120)
        exited = time.time()
        result = json.loads(Path(report).read_text())
    return {"exit_status": status, "checkpoint": result["name"], "reason": result["reason"],
            "state_mib": result["nbytes"] / 2**20, "signal_to_report_s": result["committed"] - sent,
            "signal_to_exit_s": exited - sent}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mib", type=int, default=256)
    parser.add_argument("--backends", default="local,s3")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    sys.path[:0] = [str(ROOT / "tests"), str(ROOT / "benchmarks")]
    rows = []
    for backend in args.backends.split(","):
        server = None
        for i in range(args.repeats):
            if backend == "local":
                root, env = tempfile.mkdtemp(prefix="preempt-"), {}
            else:
                from storage_roundtrip import MotoProcess

                from servers import AWS_TEST_ENV

                for name, value in AWS_TEST_ENV.items():
                    os.environ.setdefault(name, value)
                server = server or MotoProcess()
                root = f"s3://{server.new_bucket()}/run"
                env = {**AWS_TEST_ENV, "BENCH_STORAGE_OPTIONS": json.dumps({"endpoint_url": server.endpoint_url})}
            row = {"backend": backend, **measure(root, args.size_mib, env)}
            rows.append(row)
            print(json.dumps(row), flush=True)
            if backend == "local":
                shutil.rmtree(root, ignore_errors=True)
        if server is not None:
            server.stop()
    for backend in args.backends.split(","):
        picked = [r for r in rows if r["backend"] == backend]
        durable = sorted(r["signal_to_report_s"] for r in picked)
        exits = sorted(r["signal_to_exit_s"] for r in picked)
        print(f"{backend}: {picked[0]['state_mib']:.0f} MiB state; SIGTERM -> checkpoint committed "
              f"{durable[0]:.2f}-{durable[-1]:.2f} s, -> exit {exits[0]:.2f}-{exits[-1]:.2f} s, "
              f"exit status {sorted({r['exit_status'] for r in picked})}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
