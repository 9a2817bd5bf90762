"""The benchmark suite must keep running: a tiny version of every case (no targets asserted)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_every_benchmark_case_runs_at_a_tiny_size(tmp_path):
    out = tmp_path / "results"
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "run.py"), "--size-mib", "8", "--s3-size-mib", "4",
         "--train-size-mib", "4", "--train-steps", "4", "--train-every", "2", "--repeats", "1",
         "--out", str(out), "--tmp", str(tmp_path)],
        capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads((out / "results.json").read_text())
    cases = {row["case"] for row in report["results"]}
    assert cases == {"blocking", "local", "s3", "incremental", "training", "memory"}
    assert all(row["samples"] and all(v >= 0 for v in row["samples"]) for row in report["results"])
    assert "target" in done.stdout and "measurement" in done.stdout
