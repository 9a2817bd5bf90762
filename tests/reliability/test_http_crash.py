"""SIGKILL of the writing process at an HTTP request of a save, a retention prune, a ``cp`` and a
rollback, on S3 (moto) and on GCS (fake-gcs-server).

A child process (http_crash_worker.py, forked from a preloaded fork server) runs one operation
through a FaultProxy.  The proxy counts its requests and, at the chosen one, SIGKILLs the child
either before forwarding the request (it never happens) or after the server applied it (the
process dies with its answer in flight).  First, one run without a kill counts the requests of
the operation; then crash points are drawn from every (request, before/after) pair: a seeded
sample by default (``CRASH_POINTS_PER_RUN`` per operation and backend, 8 in all; the seed is
printed and can be set with CLOUDCKPT_HTTP_CRASH_SEED), every one (about 700) with
``CLOUDCKPT_HTTP_SWEEP=full``.  Every run starts from a copy of one populated root per backend.

After each kill, a new reader checks the root directly (http_util.check_root): it resolves to a
checkpoint that restores bit-exactly and verifies, latest never moved back, no manifest
references a missing chunk, no pointer dangles, nothing committed is lost.
"""

from __future__ import annotations

import multiprocessing
import os
import random
import time
from pathlib import Path

import pytest
from fault_proxy import FaultProxy
from http_util import check_root, clone, full_sweep, http_store, new_prefix, populate
from reliability_util import report

CRASH_POINTS_PER_RUN = 1
SEED = int(os.environ.get("CLOUDCKPT_HTTP_CRASH_SEED", "1313"))
STEP = "checkpoint_step_{:08d}.ckpt".format


def _expected_save(names: set[str]) -> tuple[set[str], int]:
    committed = STEP(3) in names
    return ({STEP(2), STEP(3)} if committed else {STEP(1), STEP(2)}), (3 if committed else 2)


#: What must hold at the source root after a kill: (checkpoints that must be there, lowest latest).
#: A rollback may move latest back, by design, but only to its target (step 1); step 2 is then
#: superseded, which the test checks separately (kept under superseded/, never lost).
EXPECTED = {
    "save": _expected_save,
    "prune": lambda names: ({STEP(2)}, 2),
    "cp": lambda names: ({STEP(1), STEP(2)}, 2),
    "rollback": lambda names: ({STEP(1)}, 1),
}

_context = None


def _fork_context():
    """A forkserver whose server has torch, cloudckpt and both SDKs imported (forks take milliseconds)."""
    global _context
    if _context is None:
        _context = multiprocessing.get_context("forkserver")
        _context.set_forkserver_preload(["http_crash_worker", "kill_worker", "cloudckpt.storage.s3",
                                         "cloudckpt.storage.gcs", "cloudckpt.cli"])
    return _context


def _run_child(proxy: FaultProxy, options: dict, tmp_path: Path, label: str) -> list[str]:
    import http_crash_worker

    progress = tmp_path / f"progress-{label}.txt"
    options = {**options, "progress": str(progress), "log": str(tmp_path / f"child-{label}.log")}
    process = _fork_context().Process(target=http_crash_worker.main, args=(options,), daemon=True)
    process.start()
    proxy.victim = process.pid
    process.join(120)
    if process.is_alive():
        process.kill()
        raise AssertionError(f"{label}: the child neither finished nor was killed within 120 s")
    return progress.read_text().split("\n")[:-1] if progress.exists() else []


@pytest.fixture(scope="module")
def templates(moto_s3, fake_gcs):
    """Per backend: (server, bucket, a root with steps 1 and 2), populated once for the module."""
    made = {}

    def template(flavor: str):
        if flavor not in made:
            server = moto_s3 if flavor == "s3" else fake_gcs
            bucket = server.new_bucket()
            root = http_store(flavor, bucket, server.endpoint_url, new_prefix())
            populate(root)
            made[flavor] = server, bucket, root
        return made[flavor]

    return template


@pytest.mark.timeout(3600 if full_sweep() else 300)
@pytest.mark.parametrize("operation", list(EXPECTED))
@pytest.mark.parametrize("flavor", ["s3", "gcs"])
def test_sigkill_at_an_http_request_leaves_a_consistent_root(flavor, operation, tmp_path, templates):
    env = {k: v for k, v in os.environ.items() if k.startswith("AWS_")}
    rng = random.Random(f"{SEED}-{flavor}-{operation}")
    started = time.monotonic()
    server, bucket, template = templates(flavor)
    with FaultProxy(server.endpoint_url, flavor=flavor) as proxy:

        def one_run(label: str, schedule: dict[int, str]) -> tuple[str, list[str]]:
            prefix = new_prefix()
            clone(template, http_store(flavor, bucket, server.endpoint_url, prefix))
            proxy.schedule = schedule
            proxy.reset_counts()
            options = {"flavor": flavor, "bucket": bucket, "endpoint": proxy.endpoint_url, "prefix": prefix,
                       "op": operation, "env": env}
            lines = _run_child(proxy, options, tmp_path, label)
            proxy.drain()
            return prefix, lines

        _, lines = one_run("calibrate", {})
        assert lines == ["done"], f"the operation failed without any fault: {lines}"
        total = proxy.requests
        points = [(n, when) for n in range(1, total + 1) for when in ("before", "after")]
        chosen = points if full_sweep() else sorted(rng.sample(points, CRASH_POINTS_PER_RUN))
        checked = killed = finished = 0
        for n, when in chosen:
            kills_before = proxy.killed
            prefix, lines = one_run(f"{n}-{when}", {n: f"kill_{when}"})
            errors = [line for line in lines if line.startswith("error")]
            assert not errors, f"request {n} ({when}): the child failed on its own: {errors}"
            killed += proxy.killed > kills_before
            finished += lines == ["done"]
            where = f"{flavor} {operation}, SIGKILL {when} request {n} of {total}"
            source = http_store(flavor, bucket, server.endpoint_url, prefix)
            names = {i.key for i in source.list("", recursive=False) if i.key.startswith("checkpoint_")}
            required, latest = EXPECTED[operation](names)
            checked += check_root(source, required=required, latest_at_least=latest,
                                  pointer_at_least=min(latest, 2), where=where)["checked"]
            if operation == "rollback":
                kept = names | {i.key.rsplit("/", 1)[-1] for i in source.list("superseded/")}
                assert STEP(2) in kept, f"{where}: the rolled-back checkpoint is lost: {sorted(kept)}"
            if operation == "cp":
                copy = http_store(flavor, bucket, server.endpoint_url, f"{prefix}-copy")
                checked += check_root(copy, required=set(), latest_at_least=0,
                                      where=where + " (destination)")["checked"]
    assert killed + finished == len(chosen) and killed >= len(chosen) // 2, (killed, finished)
    report(f"[http crash] {flavor} {operation}: {total} requests per run, crash points tried: {len(chosen)} "
           f"of {len(points)} (seed {SEED}{', full sweep' if full_sweep() else ''}; killed {killed}, "
           f"finished first {finished}); checkpoints checked: {checked}, partial: 0, missing chunks: 0, "
           f"latest moved back: 0, lost: 0 ({time.monotonic() - started:.1f} s)")
