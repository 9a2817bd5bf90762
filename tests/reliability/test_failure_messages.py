"""Failures that must explain themselves: an unreachable endpoint, and a save abandoned by Ctrl-C.

* Nothing listening at the endpoint (fake credentials, a closed port): the command fails after
  ``RetryPolicy.unreachable_attempts`` (3) attempts, not 8, with one error that names the
  endpoint and the setting that chose it; no retry warning says ``list ''``.
* Two Ctrl-C while an async save uploads (the first ends the program, the second interrupts
  the wait for the upload at exit): the log says the save was abandoned, that nothing was
  committed, where the orphaned chunks are and that ``gc`` reclaims them after the grace period.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from fault_proxy import FaultProxy, Rule
from reliability_util import invoke_cli, report

from cloudckpt import CheckpointManager, RetryPolicy
from cloudckpt.errors import EndpointUnreachable
from cloudckpt.storage import open_storage

REPO = Path(__file__).resolve().parents[2]


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.parametrize("scheme", ["s3", "gs"])
def test_an_unreachable_endpoint_fails_fast_and_names_the_endpoint(scheme, monkeypatch, caplog):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing-access-key")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing-secret-key")
    endpoint = f"http://127.0.0.1:{_closed_port()}"
    caplog.set_level(logging.WARNING, logger="cloudckpt")
    result = invoke_cli(["ls", f"{scheme}://bucket/run", "--endpoint-url", endpoint])
    assert result.exit_code == 1, result.output
    for needed in (endpoint, "--endpoint-url", "cannot connect"):
        assert needed in result.output, (needed, result.output)
    retries = [r.getMessage() for r in caplog.records if "retrying" in r.getMessage()]
    assert len(retries) == RetryPolicy().unreachable_attempts - 1, retries
    assert not any("list ''" in message for message in retries), retries

    # The budget is a setting: one attempt, no retry at all.
    caplog.clear()
    store = open_storage(f"{scheme}://bucket/run", endpoint_url=endpoint,
                         retry=RetryPolicy(unreachable_attempts=1))
    with pytest.raises(EndpointUnreachable, match="chosen by the endpoint_url option"):
        CheckpointManager(store).list()
    assert not [r for r in caplog.records if "retrying" in r.getMessage()]
    report(f"[unreachable] {scheme}: failed after {len(retries) + 1} attempts (of "
           f"{RetryPolicy().max_attempts} for other transient errors): {result.output.strip()[:160]}...")


_CHILD = r"""
import signal, sys, time, torch, cloudckpt
signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a terminal (a background job ignores it)
mgr = cloudckpt.CheckpointManager(sys.argv[1], storage_options={"endpoint_url": sys.argv[2]},
                                  async_save=True, capture_rng=False,
                                  transfer=cloudckpt.TransferConfig(chunk_size=64 * 1024, pack_threshold=8 * 1024,
                                                                   pack_size=64 * 1024, concurrency=1))
mgr.save({"w": torch.arange(100_000, dtype=torch.float32)}, step=1)
print("saving", flush=True)
time.sleep(120)
"""


def test_two_ctrl_c_during_an_async_upload_say_what_was_abandoned(moto_s3):
    bucket = moto_s3.new_bucket()
    root = f"s3://{bucket}/run"
    stall = Rule(lambda method, path, body: method == "PUT" and "/chunks/" in path, "slow", times=1000)
    with FaultProxy(moto_s3.endpoint_url, rules=[stall], slow_seconds=2.5) as proxy:
        env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
        child = subprocess.Popen([sys.executable, "-c", _CHILD, root, proxy.endpoint_url], env=env, cwd=REPO,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        first = child.stdout.readline()
        if first.strip() != "saving":
            child.kill()
            raise AssertionError(f"the child failed: {first!r} {child.communicate(timeout=30)[1][-2000:]}")
        while not stall.hits:  # the upload has started, and stalls
            time.sleep(0.05)
        child.send_signal(signal.SIGINT)  # the first Ctrl-C ends the program; exit waits for the upload
        time.sleep(1.0)
        child.send_signal(signal.SIGINT)  # the second one gives up on it
        _, stderr = child.communicate(timeout=60)
    for needed in ("checkpoint_step_00000001.ckpt abandoned", "nothing was committed", f"{root}/chunks/",
                   "cloudckpt gc", "grace period"):
        assert needed in stderr, (needed, stderr)
    assert "cannot schedule new futures" not in stderr, stderr
    assert not CheckpointManager(root, storage_options={"endpoint_url": moto_s3.endpoint_url}).list()
    line = next(line for line in stderr.splitlines() if "abandoned" in line)
    report(f"[ctrl-c] two interrupts during an async upload: {line.strip()[:300]}")
