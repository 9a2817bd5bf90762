"""The benchmark suite must keep running: ``run.py --quick`` (tiny states, one repeat, no target asserted)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_the_quick_benchmark_run_produces_every_table(tmp_path):
    out = tmp_path / "results"
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "run.py"), "--quick", "--out", str(out), "--tmp", str(tmp_path)],
        capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads((out / "results.json").read_text())
    settings = {row["setting"].split()[0] for row in report["results"]}
    assert settings == {"local", "s3"}
    contenders = {(row["setting"].split()[0], row["contender"].split(":")[0], row["op"]) for row in report["results"]}
    for setting in ("local", "s3"):
        assert {(setting, "cloudckpt", "save"), (setting, "cloudckpt", "restore")} <= contenders
    assert {(setting, "ceiling", op) for setting in ("local", "s3") for op in ("save", "restore")} <= contenders
    assert all(row["median_MBps"] > 0 and row["client_cpu_s_per_gib"] >= 0 for row in report["results"])
    figures = {row["setting"].split()[0] for row in report["figures"]}
    assert figures == {"requests", "blocking", "incremental", "training", "memory", "growth"}
    assert "target" in done.stdout and "contender" in done.stdout
    markdown = (out / "results.md").read_text()
    assert "### local" in markdown and "### Targets" in markdown
