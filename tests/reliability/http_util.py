"""Helpers of the HTTP-level fault suites: real S3Storage / GCSStorage clients (through a FaultProxy
or not), fresh roots, and the invariant every fault must leave intact."""

from __future__ import annotations

import datetime as _dt
import os
import uuid
from typing import Any

import boto3

from reliability_util import KiB, audit, blank_like, same_state, step_state

from cloudckpt import CheckpointManager, KeepLastN, SweepConfig, TransferConfig
from cloudckpt.pointers import LATEST_POINTER, read_pointer
from cloudckpt.storage.retry import RetryingStorage, RetryPolicy

#: Small chunks, one request at a time (so a request number names the same request in every run);
#: 64 KiB chunks go as multipart uploads (S3: one part; GCS: parts composed), 54 KiB ones as single
#: PUTs (GCS: resumable uploads, over the 32 KiB threshold below), small tensors packed.
TRANSFER = TransferConfig(chunk_size=64 * KiB, pack_threshold=8 * KiB, concurrency=1,
                          multipart_threshold=60 * KiB, part_size=16 * KiB)
GCS_RESUMABLE_THRESHOLD = 32 * KiB
SCHEMES = {"s3": "s3", "gcs": "gs"}
#: One boto3 session for every client: its loader parses the service models once per process.
SESSION = boto3.session.Session()
#: Environment switch of the long sweeps: "full" tries every crash point / seeds many storms.
SWEEP = os.environ.get("CLOUDCKPT_HTTP_SWEEP", "sample")


def full_sweep() -> bool:
    return SWEEP == "full"


class CountingPolicy(RetryPolicy):
    """Retries without sleeping, counting the retries."""

    def __init__(self, **options: Any) -> None:
        sleeps: list[float] = []
        options.setdefault("max_attempts", 25)
        super().__init__(sleep=sleeps.append, **options)
        object.__setattr__(self, "sleeps", sleeps)


def http_store(flavor: str, bucket: str, endpoint: str, prefix: str = "run", *, read_timeout: float = 60.0,
               policy: RetryPolicy | None = None) -> RetryingStorage:
    """S3Storage or GCSStorage on ``endpoint`` (moto, fake-gcs-server, or a FaultProxy before them)."""
    if flavor == "s3":
        from botocore.config import Config

        from cloudckpt.storage.s3 import S3Storage

        config = Config(retries={"mode": "standard", "total_max_attempts": 1}, read_timeout=read_timeout,
                        connect_timeout=5, max_pool_connections=16)
        client = SESSION.client("s3", endpoint_url=endpoint, region_name="us-east-1", config=config)
        backend: Any = S3Storage(bucket, prefix, client=client)
    else:
        from cloudckpt.storage.gcs import GCSStorage

        backend = GCSStorage(bucket, prefix, endpoint_url=endpoint, timeout=(5.0, read_timeout),
                             resumable_threshold=GCS_RESUMABLE_THRESHOLD, chunk_size=256 * KiB)
    return RetryingStorage(backend, policy or CountingPolicy())


def loss(step: int) -> float:
    return abs(2.5 - step)  # best at step 2 (then 3): best is not always the latest


def manager(store, *, keep: int = 2, **options: Any) -> CheckpointManager:
    return CheckpointManager(store, transfer=TRANSFER, capture_rng=False, monitor="loss",
                             retention=KeepLastN(keep), cleanup=SweepConfig(grace=_dt.timedelta(0)), **options)


def new_prefix() -> str:
    return f"run-{uuid.uuid4().hex[:10]}"


def populate(store, steps=(1, 2)) -> None:
    """Save ``steps`` into ``store`` (directly, without faults)."""
    mgr = manager(store, keep=len(steps) + 1)
    for step in steps:
        mgr.save(step_state(step), step=step, metrics={"loss": loss(step)})


def clone(template, store) -> None:
    """Copy every object of ``template`` into ``store``: a populated root for two requests per
    object (cheaper than saving it again)."""
    for info in template.list(""):
        store.put(info.key, template.get(info.key))


def check_root(store, *, required: set[str], latest_at_least: int, where: str,
               pointer_at_least: int | None = None) -> dict[str, Any]:
    """The invariant after any fault: returns the counts, raises AssertionError naming ``where``.

    * the root resolves to a checkpoint that restores bit-exactly; every visible one verifies;
    * ``latest`` never moved back: it resolves to step ``latest_at_least`` or later, and the
      ``latest.ckpt`` pointer names ``pointer_at_least`` or later (default: ``latest_at_least``;
      a kill between a commit and the pointer move leaves the pointer where it was, and readers
      take the newer manifest);
    * every visible manifest verifies, and none references a missing chunk; no pointer dangles;
    * every checkpoint in ``required`` (committed, and kept by the retention policy) is there.
    """
    found = audit(store)
    problems = []
    if found["partial"] or found["missing"] or found["dangling"]:
        problems.append(f"partial {found['partial']}, missing chunks {sorted(found['missing'])}, "
                        f"dangling {found['dangling']}")
    lost = required - set(found["names"])
    if lost:
        problems.append(f"committed checkpoints lost: {sorted(lost)} (present: {found['names']})")
    backwards = 0
    if found["names"]:
        mgr = CheckpointManager(store, capture_rng=False)
        target = blank_like(step_state(0))
        info = mgr.restore(target)
        if info is None or not same_state(target, step_state(info.step)):
            problems.append(f"latest ({info}) does not restore bit-exactly")
        elif info.step < latest_at_least:
            backwards += 1
            problems.append(f"latest moved back to step {info.step} (< {latest_at_least})")
        pointer = read_pointer(store, LATEST_POINTER)
        floor = latest_at_least if pointer_at_least is None else pointer_at_least
        if pointer is not None and pointer.step < floor:
            backwards += 1
            problems.append(f"latest.ckpt moved back to step {pointer.step}")
    elif required:
        problems.append("the root resolves to no checkpoint")
    assert not problems, f"{where}: " + "; ".join(problems)
    return {"checked": len(found["names"]), "backwards": backwards, "missing": len(found["missing"]),
            "partial": len(found["partial"]), "lost": len(lost)}
