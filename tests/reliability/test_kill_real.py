"""Promise 1 for real: a process saving checkpoints is killed with SIGKILL at random moments.

A child process (kill_worker.py, forked from a preloaded fork server so that each start costs
milliseconds, not a torch import) resumes from the newest checkpoint and saves ~3 MiB states in
256 KiB chunks, retention KeepLastN(2) with an immediate sweep, to a local directory and to S3
(moto in this process; the child gets the endpoint).  After it reports it started, it is
killed with SIGKILL after a random delay (a seeded RNG; the seed is printed and can be set
with CLOUDCKPT_KILL_SEED).  After each kill, this process opens a new manager and checks:

* every visible checkpoint verifies (partial checkpoints visible: must be 0);
* ``restore("latest")`` succeeds and gives the exact state of its step (failed restores: 0);
* latest is at or past the last step the child reported durable (checkpoints lost: 0).
"""

from __future__ import annotations

import multiprocessing
import os
import random
import time
from pathlib import Path

import pytest
from kill_worker import blank, manager, state
from reliability_util import audit, report, same_state

KILLS_PER_BACKEND = 12
#: Longest wait before a kill, per backend: an S3 child's first write also probes the store's
#: capabilities (7 requests) and each save is a few round trips to moto, so it needs longer to
#: commit anything at all on a loaded 2-core machine.
MAX_DELAY_S = {"local": 0.7, "s3": 2.0}
pytestmark = pytest.mark.slow

_context = None


def _fork_context():
    """A forkserver whose server process has torch, cloudckpt and boto3 imported already."""
    global _context
    if _context is None:
        _context = multiprocessing.get_context("forkserver")
        _context.set_forkserver_preload(["kill_worker", "cloudckpt.storage.s3"])
    return _context


def _progress(path: Path) -> list[str]:
    if not path.exists():
        return []
    text = path.read_text()
    return [line for line in text.split("\n")[:-1]]  # only complete lines


def _wait_started(path: Path, process, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        lines = _progress(path)
        if any(line.startswith("error") for line in lines):
            raise AssertionError(f"the child failed: {lines}")
        if any(line.startswith("started") for line in lines):
            return
        if not process.is_alive():
            raise AssertionError(f"the child exited with {process.exitcode} before starting: {lines}")
        time.sleep(0.005)
    raise AssertionError(f"the child did not start within {timeout} s: {_progress(path)}")


@pytest.mark.parametrize("backend", ["local", "s3"])
def test_sigkill_at_random_moments_never_exposes_a_partial_checkpoint(backend, tmp_path, request):
    seed = int(os.environ.get("CLOUDCKPT_KILL_SEED", "4242")) + (backend == "s3")
    rng = random.Random(seed)
    max_delay = MAX_DELAY_S[backend]
    if backend == "local":
        root, endpoint, env = str(tmp_path / "root"), None, {}
    else:
        server = request.getfixturevalue("moto_s3")
        root, endpoint = f"s3://{server.new_bucket()}/killed", server.endpoint_url
        env = {k: os.environ[k] for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")}
    context = _fork_context()
    import kill_worker

    kills = partial = failed = lost = backwards = committed_total = 0
    latest_step = durable = 0
    delays = []
    problems: list[str] = []
    started = time.monotonic()
    for round_ in range(KILLS_PER_BACKEND):
        progress = tmp_path / f"progress-{round_}.txt"
        options = {"root": root, "endpoint_url": endpoint, "env": env, "progress": str(progress),
                   "log": str(tmp_path / f"child-{round_}.log"), "async_save": round_ % 3 == 2}
        process = context.Process(target=kill_worker.main, args=(options,), daemon=True)
        process.start()
        _wait_started(progress, process)
        delay = rng.uniform(0.02, max_delay)
        delays.append(delay)
        time.sleep(delay)
        process.kill()  # SIGKILL: no handler, no atexit, no flush
        process.join(30)
        kills += 1
        lines = _progress(progress)
        errors = [line for line in lines if line.startswith("error")]
        if errors:
            problems.append(f"kill {round_}: the child failed on its own: {errors}")
        committed = [int(line.split()[1]) for line in lines if line.startswith("committed")]
        committed_total += len([c for c in committed if c > 0])
        durable = max([durable, *committed])

        # -- what a new process finds ------------------------------------------------------------
        mgr = manager(root, endpoint, async_save=False)
        found = audit(mgr.store)
        if found["partial"] or found["missing"] or found["dangling"]:
            partial += 1
            problems.append(f"kill {round_}: {found['partial']} {sorted(found['missing'])} {found['dangling']}")
        target = blank()
        try:
            info = mgr.restore(target)
            # an empty root is right only while no save was reported durable (a kill before the first commit)
            assert (info is None and durable == 0) or (info is not None and same_state(target, state(info.step))), info
        except Exception as exc:  # noqa: BLE001 - counted
            failed += 1
            problems.append(f"kill {round_}: restore failed: {type(exc).__name__}: {exc}")
            continue
        finally:
            mgr.close()
        if info is None:
            continue
        if info.step < durable:
            lost += 1
            problems.append(f"kill {round_}: latest is step {info.step}, but step {durable} was reported durable")
        if info.step < latest_step:
            backwards += 1
            problems.append(f"kill {round_}: latest went back from {latest_step} to {info.step}")
        latest_step = info.step
    elapsed = time.monotonic() - started
    # Garbage the kills left: a prune by a new writer (grace 0) removes unreferenced chunks; on a
    # local root, temporary files of writes cut short are not objects and nothing removes them.
    mgr = manager(root, endpoint, async_save=False)
    mgr.prune()
    after = audit(mgr.store)
    mgr.close()
    temp_files = [p for p in Path(root).rglob("*.cloudckpt-tmp-*")] if backend == "local" else []
    report(f"[kill -9] {backend} seed={seed}: kills: {kills} (delays {min(delays):.2f}-{max(delays):.2f} s), "
           f"saves committed: {committed_total}, final step {latest_step}, "
           f"partial checkpoints visible: {partial}, restores failed: {failed}, checkpoints lost: {lost}, "
           f"latest moved back: {backwards}; after a prune: {len(after['unreferenced'])} unreferenced chunks, "
           f"{len(after['pending'])} pending uploads, {len(temp_files)} orphaned temp files ({elapsed:.1f} s)")
    assert not problems, "\n".join(problems)
    assert not after["unreferenced"] and not after["partial"] and not after["missing"]
    assert latest_step >= KILLS_PER_BACKEND // 2, "the child hardly ever committed anything"
