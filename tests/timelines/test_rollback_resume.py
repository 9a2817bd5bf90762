"""Rollback, then resume in a new process: the new timeline is bit-identical to a run that trained
it from the rollback point without the detour; latest, best and retention agree with it.

Three training processes per run, so it runs on S3 only: rollback on GCS is covered by
test_reproductions.py (rollback then continue) and by the HTTP crash sweep
(tests/reliability/test_http_crash.py), and what makes the run bit-identical (RNG, optimizer,
data position restored) does not depend on the store."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cloudckpt import CheckpointManager, KeepBestK, KeepLastN
from cloudckpt.retention import RetentionContext

WORKER = Path(__file__).with_name("train_worker.py")


def _train(root: str, out: Path, until: int, data: str, endpoint: str, switch_at: int = 0) -> dict:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[2]), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, str(WORKER), root, str(out), "--until", str(until), "--data", data,
                           "--switch-at", str(switch_at), "--endpoint-url", endpoint],
                          capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    return torch.load(out)


def _bits_equal(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.view(-1).view(torch.uint8),
                                                                          b.view(-1).view(torch.uint8))
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_bits_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_bits_equal(x, y) for x, y in zip(a, b))
    return a == b


@pytest.mark.parametrize("cloud_root", ["s3"], indirect=True)
def test_rollback_then_resume_is_the_run_without_the_detour(cloud_root, tmp_path):
    endpoint = cloud_root.cli_options[1]
    url = cloud_root.url
    _train(url, tmp_path / "detour.pt", 30, "a", endpoint)                     # saves 5..30; a spike at 30
    mgr = CheckpointManager(cloud_root.store, monitor="loss")
    report = mgr.rollback(to=20)
    assert [m.step for m in report.superseded] == [25, 30]
    resumed = _train(url, tmp_path / "resumed.pt", 30, "b", endpoint)          # a new process, other data

    reference_root = url.rsplit("/", 1)[0] + "/reference"
    reference = _train(reference_root, tmp_path / "reference.pt", 30, "a,b", endpoint, switch_at=20)
    assert _bits_equal(resumed, reference)

    reader = CheckpointManager(cloud_root.store, monitor="loss")
    live = reader.list()
    assert reader.latest().step == 30 and reader.latest().timeline == report.timeline
    assert reader.best().name in {i.name for i in live}
    policy = KeepLastN(3) | KeepBestK(1)
    expected = policy(live, RetentionContext("loss", "min")) | {reader.best().name, reader.latest().name}
    assert {i.name for i in live} == expected                                   # retention counted live ones only
    superseded = [i for i in reader.list(superseded=True) if i.superseded]
    assert sorted(i.step for i in superseded) == [25, 30]                       # kept, untouched by retention
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Dropout(0.2), torch.nn.Linear(16, 1))
    reader.restore({"model": model}, keys=["model"])                          # latest is the new step 30
    assert _bits_equal(dict(model.state_dict()), dict(reference["model"]))
