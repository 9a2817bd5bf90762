"""Promise 2: train k steps, save, resume in a NEW PROCESS, train to N == train N straight, bit for bit.

The job (resume_worker.py) has dropout, input noise and a loss scale drawn from
torch's, Python's and NumPy's global generators, AdamW, StepLR, and a shuffling
ResumableSampler; step k=10 is in the middle of the second epoch.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from ckpt_util import assert_same_tensor
from resume_worker import Job

from cloudckpt import CheckpointManager

N, K = 24, 10
WORKER = Path(__file__).with_name("resume_worker.py")
REPO = Path(__file__).resolve().parents[2]


def _straight(loader_generator: bool = True) -> dict:
    job = Job(seed=0, loader_generator=loader_generator)
    job.train(N)
    return job.result()


def _assert_same_result(got: dict, ref: dict) -> None:
    assert got["step"] == ref["step"] == N
    assert got["lr"] == ref["lr"]
    assert got["params"].keys() == ref["params"].keys()
    for name, value in ref["params"].items():
        assert_same_tensor(got["params"][name], value, f"params[{name}]")
    assert got["optimizer"]["param_groups"] == ref["optimizer"]["param_groups"]
    assert got["optimizer"]["state"].keys() == ref["optimizer"]["state"].keys()
    for pid, entry in ref["optimizer"]["state"].items():
        assert got["optimizer"]["state"][pid].keys() == entry.keys()
        for name, value in entry.items():
            assert_same_tensor(got["optimizer"]["state"][pid][name], value, f"optimizer.state[{pid}][{name}]")


@pytest.mark.parametrize("backend", ["local", "s3"])
def test_resume_in_a_new_process_is_bit_identical(backend, request, tmp_path):
    ref = _straight()
    assert len(ref["losses"]) == N and len(set(ref["losses"])) == N

    first = Job(seed=0)
    first.train(K)
    assert (first.sampler.epoch, first.sampler.position) == (1, 4), "k must stop mid-epoch"
    assert first.losses == ref["losses"][:K]

    if backend == "local":
        root, endpoint = str(tmp_path / "ckpts"), None
    else:
        server = request.getfixturevalue("moto_s3")
        root, endpoint = f"s3://{server.new_bucket()}/resume", server.endpoint_url
    options = {"endpoint_url": endpoint} if endpoint else None
    with CheckpointManager(root, storage_options=options) as mgr:
        mgr.save(first.state(), step=K)
    del first

    out = tmp_path / "resumed.pt"
    env = dict(os.environ)  # carries AWS_* credentials set for moto by tests/servers.py
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    args = [sys.executable, str(WORKER), root, str(out), str(N), *([endpoint] if endpoint else [])]
    proc = subprocess.run(args, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120,
                          check=False)
    assert proc.returncode == 0, f"resume worker failed:\n{proc.stdout}\n{proc.stderr}"

    got = torch.load(out, weights_only=True)
    assert got["resumed_from"] == K
    assert got["losses"] == ref["losses"][K:], "losses after the resume differ from the straight run"
    _assert_same_result(got, ref)


def test_resume_in_process_is_bit_identical():
    """The same promise without a process boundary (fast, memory store): a control for the above."""
    ref = _straight()
    first = Job(seed=0)
    first.train(K)
    mgr = CheckpointManager("memory://")
    mgr.save(first.state(), step=K)
    torch.manual_seed(777)  # scramble the global RNG: the checkpoint must bring it back
    second = Job(seed=12345)
    assert mgr.restore(second.state()).step == K
    assert second.progress["step"] == K and second.sampler.state_dict() == first.sampler.state_dict()
    second.train(N)
    assert second.losses == ref["losses"][K:]
    _assert_same_result(second.result(), ref)


@pytest.mark.xfail(strict=True, reason=(
    "Documented limitation (docs/DESIGN.md, 'Exact resume'): DataLoader.__iter__ draws a base seed "
    "from torch's global generator; a hand-written loop resumed mid-epoch calls iter() where the "
    "straight run did not, so later dropout masks shift. cloudckpt.Trainer compensates; other loops "
    "pass DataLoader(generator=torch.Generator())"))
def test_resume_with_a_default_dataloader_is_bit_identical():
    ref = _straight(loader_generator=False)
    first = Job(seed=0, loader_generator=False)
    first.train(K)
    mgr = CheckpointManager("memory://")
    mgr.save(first.state(), step=K)
    second = Job(seed=12345, loader_generator=False)
    mgr.restore(second.state())
    second.train(N)
    assert second.losses == ref["losses"][K:]
