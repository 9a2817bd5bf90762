"""benchmarks/scaling_sim.py keeps running, and the commit it simulates stays O(ranks) small."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_simulated_commit_grows_by_one_small_row_per_rank():
    code = "import json, scaling_sim; print(json.dumps(scaling_sim.simulate((16, 128))))"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT / "benchmarks", env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    small, large = report["commit"]
    per_rank = (large["manifest_bytes"] - small["manifest_bytes"]) / (128 - 16)
    assert per_rank < 2 * 2**20 / 8192  # so 8,192 ranks commit a manifest under 2 MiB
    assert large["gather_bytes"] / 128 < 1024  # a digest per rank, not its tensor table
    # rank 0 writes the same objects at any size (manifest, pointers, run index); its reads grow with the
    # checkpoints already in the root (best tracking reads them), not with the ranks
    assert large["rank0_requests_by_verb"]["put"] == small["rank0_requests_by_verb"]["put"]
    for row in report["per_rank"]:
        assert row["items"] == 3 * report["tensors"] and row["metadata_puts"] == 1
