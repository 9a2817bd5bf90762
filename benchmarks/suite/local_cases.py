"""Local-disk cases: full saves against every local peer, the time a save blocks training,
incremental and fine-tuning saves, a training loop's slowdown, and peak memory."""

from __future__ import annotations

import logging
import os
import shutil
import time

import torch

import cloudckpt

from .compare import compare, remove_tree
from .contenders import LOCAL
from .measure import measure
from .workload import MiB, Workload

log = logging.getLogger("bench")


def run_local(bench, size_mib: float) -> str:
    """Every local contender: a full save into a fresh directory, then a restore into the live objects."""
    work = Workload(size_mib, seed=0)
    setting = f"local {work.nbytes / MiB:.0f} MiB"
    results, skipped = compare(setting, LOCAL, work, lambda c, i: str(bench.fresh(f"local-{i}-{id(c)}")),
                               repeats=bench.args.repeats, cleanup=remove_tree)
    bench.add(setting, results, skipped)
    bench.note(setting, "fsync on every writer; restores read from a warm page cache; every restore is checked")
    return setting


def run_blocking(bench, size_mib: float) -> None:
    """How long a save keeps training waiting, against a plain torch copy into preallocated memory."""
    work = Workload(size_mib, seed=2)
    setting = f"blocking {work.nbytes / MiB:.0f} MiB"
    reps = bench.args.repeats
    tensors = work.tensors()
    pinned = torch.cuda.is_available()
    buffers = [torch.empty(t.shape, dtype=t.dtype, pin_memory=pinned).fill_(0) for t in tensors]

    def floor_copy() -> None:
        with torch.no_grad():
            for buffer, tensor in zip(buffers, tensors):
                buffer.copy_(tensor, non_blocking=pinned)
        if pinned:
            torch.cuda.synchronize()

    floor_copy()
    rows = {"floor: torch copy into preallocated buffers (no cloudckpt code)": [], "cloudckpt async save": [],
            "DCP async_save": [], "cloudckpt sync save (fsync)": [], "torch.save (fsync)": []}
    mgr = cloudckpt.CheckpointManager(bench.fresh("async"), async_save=True, capture_rng=False)
    mgr.save(work.state, step=0)
    mgr.wait()
    dcp_error = _dcp_async_warmup(work, bench.fresh("dcp-warm"))
    for i in range(1, reps + 1):
        work.step()
        rows["floor: torch copy into preallocated buffers (no cloudckpt code)"].append(measure(floor_copy).seconds)
        rows["cloudckpt async save"].append(measure(lambda: mgr.save(work.state, step=i)).seconds)
        mgr.wait()
        if dcp_error is None:
            rows["DCP async_save"].append(_dcp_async_blocking(work, bench.fresh(f"dcp-{i}")))
        with cloudckpt.CheckpointManager(bench.fresh(f"sync-{i}"), capture_rng=False) as sync:
            rows["cloudckpt sync save (fsync)"].append(measure(lambda: sync.save(work.state, step=i)).seconds)
        path = bench.fresh(f"torch-{i}.pt")
        rows["torch.save (fsync)"].append(measure(lambda: _torch_save(work, path)).seconds)
    mgr.close()
    if dcp_error:
        bench.skipped[f"{setting} / DCP async_save"] = dcp_error
    figures = {name: bench.figure(setting, name, "s", samples) for name, samples in rows.items() if samples}
    floor = figures["floor: torch copy into preallocated buffers (no cloudckpt code)"].median
    ours = figures["cloudckpt async save"].median
    bench.target(setting, "async blocking / floor copy", ours / floor, 1.5, higher_is_better=False)
    if "DCP async_save" in figures:
        bench.target(setting, "async blocking / DCP async_save blocking", ours / figures["DCP async_save"].median,
                     0.5, higher_is_better=False)
    bench.note(setting, f"floor buffers {'pinned' if pinned else 'not pinned (no CUDA here)'}; every save follows "
                        "a real optimizer step")


def _torch_save(work: Workload, path) -> None:
    with open(path, "wb") as fh:
        torch.save(work.state_dict(), fh)
        fh.flush()
        os.fsync(fh.fileno())


def _dcp_async_warmup(work: Workload, path) -> str | None:
    try:
        _dcp_async_blocking(work, path)  # the first call sets up DCP's staging
        return None
    except Exception as exc:
        log.warning("DCP async_save cannot run: %s", exc)
        return f"failed: {type(exc).__name__}: {exc}"


def _dcp_async_blocking(work: Workload, path) -> float:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_sd, optim_sd = get_state_dict(work.model, work.optimizer)
    start = time.perf_counter()
    future = dcp.async_save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(path))
    blocked = time.perf_counter() - start
    future.result()
    return blocked


def run_incremental(bench, size_mib: float, *, finetune: bool) -> None:
    """Saves into one root after real optimizer steps: full training (no reuse) or fine-tuning (frozen backbone)."""
    work = Workload(size_mib, seed=3, finetune=finetune)
    kind = "fine-tuning (frozen backbone, trained head)" if finetune else "full training"
    setting = f"incremental {work.nbytes / MiB:.0f} MiB, {kind}"
    saves, uploaded, full = [], [], []
    for repeat in range(bench.args.repeats):
        root = bench.fresh(f"incr-{finetune}-{repeat}")
        with cloudckpt.CheckpointManager(root, capture_rng=False) as mgr:
            first = measure(lambda: mgr.save(work.state, step=0))
            for step in (1, 2):
                work.step()
                info: list = []
                saves.append(measure(lambda: info.append(mgr.save(work.state, step=step))).seconds)
                uploaded.append(info[0].stats.bytes_uploaded / work.nbytes)
        full.append(first.seconds)
        shutil.rmtree(root, ignore_errors=True)
    bench.figure(setting, "first (full) save into a fresh root", "s", full)
    bench.figure(setting, "later save into the same root, after one optimizer step", "s", saves)
    bench.figure(setting, "bytes uploaded by a later save / state", "ratio", uploaded)
    trained = sum(p.numel() for p in work.model.parameters() if p.requires_grad)
    bench.note(setting, f"trained parameters: {trained / sum(p.numel() for p in work.model.parameters()):.1%}; "
                        "labelled incremental: these saves reuse chunks of the earlier one")


def run_training(bench, size_mib: float) -> None:
    """Slowdown of a real training loop that checkpoints every K steps (async and sync, local disk)."""
    work = Workload(size_mib, seed=4)
    work.batch = torch.randn(32, work.dim)
    every, steps = bench.args.train_every, bench.args.train_steps
    setting = f"training {work.nbytes / MiB:.0f} MiB"

    def loop(mgr) -> float:
        start = time.perf_counter()
        for step in range(1, steps + 1):
            work.step()
            if mgr is not None and step % every == 0:
                mgr.save(work.state, step=step)
        if mgr is not None:
            mgr.wait()
        return time.perf_counter() - start

    loop(None)
    rows: dict[str, list[float]] = {"no checkpoints": [], "async save every K": [], "sync save every K": []}
    for repeat in range(bench.args.repeats):
        rows["no checkpoints"].append(loop(None))
        for label, is_async in (("async save every K", True), ("sync save every K", False)):
            with cloudckpt.CheckpointManager(bench.fresh(f"train-{is_async}-{repeat}"), async_save=is_async,
                                             capture_rng=False, retention=cloudckpt.KeepLastN(2)) as mgr:
                rows[label].append(loop(mgr))
    figures = {k: bench.figure(setting, f"{steps} steps, {k} (K={every})", "s", v) for k, v in rows.items()}
    base = figures["no checkpoints"].median
    bench.target(setting, "slowdown, async save every K", figures["async save every K"].median / base - 1, 0.05,
                 higher_is_better=False)


def _status_bytes(name: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(name + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{name} not in /proc/self/status")


def run_memory(bench, size_mib: float) -> None:
    """Peak extra resident memory while async saves run, relative to the state size."""
    work = Workload(size_mib, seed=6)
    setting = f"memory {work.nbytes / MiB:.0f} MiB"
    with cloudckpt.CheckpointManager(bench.fresh("memory"), async_save=True, capture_rng=False) as mgr:

        def two_saves() -> None:
            for step in range(2):
                mgr.save(work.state, step=step)
                mgr.wait()
                work.step()

        _, extra = _peak_extra(two_saves)
    ratio = extra / work.nbytes
    bench.figure(setting, "peak extra RSS during async saves / state size", "ratio", [ratio])
    bench.target(setting, "peak extra memory / state", ratio, 1.2, higher_is_better=False)


def _peak_extra(fn) -> tuple[float, int]:
    """Seconds of ``fn()`` and the most resident memory it added above the level before it."""
    before = _status_bytes("VmRSS")
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")  # reset the peak (VmHWM) to the current RSS
    sample = measure(fn)
    return sample.seconds, _status_bytes("VmHWM") - before


def run_growth(bench, sizes: list[float], s3_env_factory=None) -> None:
    """How cloudckpt's save and restore time and peak memory grow with the state (local, and S3 when given)."""
    setting = "growth with state size"
    stores = [("local", lambda size: str(bench.fresh(f"growth-{size}")))]
    if s3_env_factory is not None:
        env = s3_env_factory()
        stores.append(("s3", lambda size: f"s3://{env.new_bucket()}/growth"))
    try:
        for size in sizes:
            work = Workload(size, seed=7)
            for store, where in stores:
                options = {"endpoint_url": env.url} if store == "s3" else None
                rows: dict[str, list[float]] = {}
                for repeat in range(1 if size > 2048 else bench.args.repeats):
                    root = where(size)
                    with cloudckpt.CheckpointManager(root, capture_rng=False, storage_options=options) as mgr:
                        for op, run in (("save", lambda: mgr.save(work.state, step=0)),
                                        ("restore", lambda: mgr.restore(work.state))):
                            seconds, extra = _peak_extra(run)
                            rows.setdefault(f"{op} seconds per GiB", []).append(seconds / (work.nbytes / 2**30))
                            rows.setdefault(f"{op} peak extra RSS / state", []).append(extra / work.nbytes)
                    if store == "local":
                        shutil.rmtree(root, ignore_errors=True)
                for name, samples in rows.items():
                    bench.figure(setting, f"{store} {work.nbytes / MiB:.0f} MiB: {name}",
                                 "s/GiB" if "seconds" in name else "ratio", samples)
            del work
    finally:
        if s3_env_factory is not None:
            env.stop()
    bench.note(setting, "cloudckpt alone, defaults; a local restore's extra RSS is the chunk files it maps "
                        "(page cache, not anonymous memory); an S3 restore stages at most staging_budget")
