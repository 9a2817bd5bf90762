"""Retries: storms of transient failures are absorbed; permanent failures fail fast, typed, once.

1. In process: 30% of storage calls fail transiently (FaultyStorage under RetryingStorage with
   a no-op sleep), optionally with lost responses too (the call took effect, the answer did
   not arrive).  Every save and restore succeeds; nothing is lost or duplicated.
2. Over HTTP: a fault-injecting proxy (fault_proxy.py) in front of moto answers a seeded ~30%
   of requests with 503 SlowDown / 500 / 429, resets the connection before or after the
   request took effect, or holds the answer past the client's read timeout.  A full save +
   restore runs through it with the real S3Storage + RetryingStorage.
3. Permanent errors (403 AccessDenied, a missing bucket, bad or no credentials) raise the
   typed error with a hint after exactly one request: nothing is retried.
4. A training loop continues (on_save_error="warn") or stops (on_save_error="raise") when its
   saves fail.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging

import pytest
import torch
from fault_proxy import FaultProxy, s3_client
from reliability_util import (
    KiB,
    Clock,
    LostResponses,
    audit,
    blank_like,
    report,
    same_state,
    step_state,
)

from cloudckpt import (
    CheckpointCallback,
    CheckpointManager,
    KeepBestK,
    KeepLastN,
    MemoryStorage,
    NotFound,
    PermissionDenied,
    SweepConfig,
    Trainer,
    TransferConfig,
)
from cloudckpt.pointers import STATE_KEY
from cloudckpt.storage.faults import FaultyStorage
from cloudckpt.storage.retry import RetryingStorage, RetryPolicy
from cloudckpt.storage.s3 import S3Storage

SAVES = 6
HTTP_SAVES = 4
TRANSFER = TransferConfig(chunk_size=64 * KiB, pack_threshold=8 * KiB, concurrency=1,
                          multipart_threshold=48 * KiB, part_size=16 * KiB)


class CountingPolicy(RetryPolicy):
    """A RetryPolicy with a no-op sleep that counts the retries it made."""

    def __init__(self, **options) -> None:
        sleeps: list[float] = []
        super().__init__(sleep=sleeps.append, **options)
        object.__setattr__(self, "sleeps", sleeps)


def _name(step: int) -> str:
    return f"checkpoint_step_{step:08d}.ckpt"


def _loss(step: int) -> float:
    return abs(3.5 - step)  # best at steps 3 and 4 (3 wins: earlier), so best is not the latest


def _check_run(store, inner, reader_store, label: str, saves: int = SAVES) -> dict:
    """Everything a storm must not break; returns counts for the report."""
    expected = {_name(s) for s in (saves - 2, saves - 1, saves)} | {_name(3)}  # KeepLastN(3) | KeepBestK(1)
    found = audit(inner)
    assert set(found["names"]) == expected, f"{label}: {found['names']}"
    assert not found["partial"] and not found["missing"] and not found["dangling"], found
    reader = CheckpointManager(reader_store, transfer=TRANSFER, capture_rng=False, monitor="loss")
    for step in sorted({saves, saves - 1, saves - 2, 3}):
        target = blank_like(step_state(0))
        info = reader.restore(target, which=_name(step))
        assert info.step == step and same_state(target, step_state(step)), f"{label}: step {step}"
    target = blank_like(step_state(0))
    assert reader.restore(target).step == saves and same_state(target, step_state(saves))
    assert reader.best().name == _name(3)
    # The run's index lists each kept checkpoint once, and the best history has no duplicates.
    index = json.loads(inner.get(STATE_KEY))
    assert set(index["checkpoints"]) == expected, index["checkpoints"].keys()
    history = [h["name"] for h in index["best_history"]["loss"]]
    assert len(history) == len(set(history)), history
    return found


@pytest.mark.parametrize("async_save", [False, True], ids=["sync", "async"])
@pytest.mark.parametrize("lost_rate", [0.0, 0.1], ids=["transient", "transient+lost-responses"])
def test_30_percent_transient_failures_are_absorbed(async_save, lost_rate):
    clock = Clock()
    inner = MemoryStorage(clock=clock)
    lossy = LostResponses(inner, lost_rate, seed=3) if lost_rate else inner
    faulty = FaultyStorage(lossy, transient_rate=0.3, seed=11)
    policy = CountingPolicy(max_attempts=16)
    store = RetryingStorage(faulty, policy)
    mgr = CheckpointManager(store, transfer=TRANSFER, capture_rng=False, monitor="loss",
                            retention=KeepLastN(3) | KeepBestK(1), async_save=async_save,
                            cleanup=SweepConfig(grace=_dt.timedelta(0), clock=clock,
                                                stale_upload_age=_dt.timedelta(hours=1)))
    for step in range(1, SAVES + 1):
        mgr.save(step_state(step), step=step, metrics={"loss": _loss(step)})
    mgr.wait()
    label = f"storm {'async' if async_save else 'sync'} lost={lost_rate}"
    found = _check_run(store, inner, store, label)
    orphans = len(found["pending"])  # multipart uploads whose start reply was lost
    clock.advance(_dt.timedelta(days=2))
    mgr.prune()
    after = audit(inner)
    assert not after["unreferenced"] and not after["pending"], after
    lost = getattr(lossy, "lost", 0)
    report(f"[storm] {label}: {len(faulty.calls)} storage calls, {faulty.injected} transient failures injected, "
           f"{lost} responses lost after the call took effect, {len(policy.sleeps)} retries; "
           f"saves ok: {SAVES}/{SAVES}, restores ok: 5/5, checkpoints lost: 0, duplicated: 0, "
           f"orphaned multipart uploads {orphans} (aborted by the next prune)")
    assert faulty.injected >= 0.2 * len(faulty.calls)


# -- over HTTP, through the fault proxy ----------------------------------------------------------------
def _s3_store(bucket: str, endpoint: str, *, read_timeout: float = 60.0, policy: RetryPolicy | None = None):
    backend = S3Storage(bucket, "run", client=s3_client(endpoint, read_timeout=read_timeout))
    return RetryingStorage(backend, policy or CountingPolicy())


def test_full_save_and_restore_through_a_faulty_http_proxy(moto_s3):
    seed = 20240601
    bucket = moto_s3.new_bucket()
    clock = Clock()
    with FaultProxy(moto_s3.endpoint_url, fault_rate=0.3, seed=seed, slow_seconds=0.8) as proxy:
        policy = CountingPolicy(max_attempts=12)
        store = _s3_store(bucket, proxy.endpoint_url, read_timeout=0.5, policy=policy)
        transfer = TransferConfig(chunk_size=64 * KiB, pack_threshold=8 * KiB, concurrency=4)
        mgr = CheckpointManager(store, transfer=transfer, capture_rng=False, monitor="loss",
                                retention=KeepLastN(3) | KeepBestK(1),
                                cleanup=SweepConfig(grace=_dt.timedelta(0), clock=clock))
        for step in range(1, HTTP_SAVES + 1):
            mgr.save(step_state(step), step=step, metrics={"loss": _loss(step)})
        target = blank_like(step_state(0))
        info = mgr.restore(target)
        assert info.step == HTTP_SAVES and same_state(target, step_state(HTTP_SAVES))
        mgr.verify()
        proxy.drain()  # late ("slow") requests have now reached moto
        outcomes = proxy.outcomes
        requests = len(proxy.log)
    direct = _s3_store(bucket, moto_s3.endpoint_url)
    found = _check_run(direct, direct, direct, "http storm", saves=HTTP_SAVES)
    report(f"[storm] http proxy seed={seed}: {requests} requests, {requests - outcomes['forwarded']} faults "
           f"({', '.join(f'{k}: {v}' for k, v in sorted(outcomes.items()) if k != 'forwarded')}), "
           f"{len(policy.sleeps)} retries; saves ok: {HTTP_SAVES}/{HTTP_SAVES}, restore + verify ok, "
           f"partial checkpoints visible: {len(found['partial'])}, missing chunks: {len(found['missing'])}")
    assert requests - outcomes["forwarded"] >= 0.15 * requests
    assert {"503", "500", "429", "reset", "reset_after"} <= set(outcomes), outcomes


# -- permanent errors: typed, with a hint, never retried ---------------------------------------------
PERMANENT = {
    "403": (PermissionDenied, "access denied", "check the credentials"),
    "invalid_key": (PermissionDenied, "InvalidAccessKeyId", "check the credentials"),
    "signature": (PermissionDenied, "SignatureDoesNotMatch", "check the credentials"),
}


@pytest.mark.parametrize("mode", list(PERMANENT))
def test_permanent_http_errors_fail_fast_without_retries(moto_s3, mode):
    error, what, hint = PERMANENT[mode]
    bucket = moto_s3.new_bucket()
    with FaultProxy(moto_s3.endpoint_url, always=mode) as proxy:
        policy = CountingPolicy()
        mgr = CheckpointManager(_s3_store(bucket, proxy.endpoint_url, policy=policy), capture_rng=False)
        with pytest.raises(error) as excinfo:
            mgr.save(step_state(1), step=1)
        requests = len(proxy.log)
    message = str(excinfo.value)
    assert what in message and hint in message and bucket in message, message
    assert requests == 1 and policy.sleeps == [], (requests, policy.sleeps)
    report(f"[fail-fast] {mode}: {type(excinfo.value).__name__} after {requests} request, "
           f"{len(policy.sleeps)} retries")


def test_missing_bucket_is_not_found_after_one_request(moto_s3):
    with FaultProxy(moto_s3.endpoint_url) as proxy:
        policy = CountingPolicy()
        mgr = CheckpointManager(_s3_store("no-such-bucket-cloudckpt", proxy.endpoint_url, policy=policy),
                                capture_rng=False)
        with pytest.raises(NotFound) as excinfo:
            mgr.save(step_state(1), step=1)
        requests = len(proxy.log)
    message = str(excinfo.value)
    assert "no-such-bucket-cloudckpt" in message and "does not exist" in message, message
    assert requests == 1 and policy.sleeps == []
    report(f"[fail-fast] missing bucket: NotFound after {requests} request, {len(policy.sleeps)} retries")


def test_no_credentials_is_permission_denied_before_any_request(moto_s3, monkeypatch, tmp_path):
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    with FaultProxy(moto_s3.endpoint_url) as proxy:
        policy = CountingPolicy()
        mgr = CheckpointManager(_s3_store(moto_s3.new_bucket(), proxy.endpoint_url, policy=policy),
                                capture_rng=False)
        with pytest.raises(PermissionDenied) as excinfo:
            mgr.save(step_state(1), step=1)
        requests = len(proxy.log)
    assert "credentials" in str(excinfo.value)
    assert requests == 0 and policy.sleeps == []
    report(f"[fail-fast] no credentials: PermissionDenied after {requests} requests, {len(policy.sleeps)} retries")


# -- the training loop: continue (warn) or stop (raise) ----------------------------------------------
def _trainer(callback: CheckpointCallback, epochs: int = 3) -> Trainer:
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    data = [(torch.randn(8, 4), torch.randn(8, 1)) for _ in range(2)]
    return Trainer(model, torch.optim.SGD(model.parameters(), lr=0.1), data,
                   lambda m, b: torch.nn.functional.mse_loss(m(b[0]), b[1]),
                   val_loader=data, callbacks=[callback], max_epochs=epochs)


@pytest.mark.parametrize("on_save_error", ["warn", "raise"])
def test_training_continues_or_stops_when_saves_are_refused(moto_s3, on_save_error, caplog):
    bucket = moto_s3.new_bucket()
    with FaultProxy(moto_s3.endpoint_url, always="403", writes_only=True) as proxy:
        policy = CountingPolicy()
        manager = CheckpointManager(_s3_store(bucket, proxy.endpoint_url, policy=policy), monitor="val_loss")
        callback = CheckpointCallback(None, manager=manager, on_save_error=on_save_error)
        trainer = _trainer(callback)
        with caplog.at_level(logging.WARNING, logger="cloudckpt"):
            if on_save_error == "raise":
                with pytest.raises(PermissionDenied):
                    trainer.fit()
            else:
                trainer.fit()
        writes = [e for e in proxy.log if e.method in ("PUT", "POST", "DELETE")]
    warnings = [r.getMessage() for r in caplog.records if "training continues" in r.getMessage()]
    if on_save_error == "warn":
        assert trainer.epoch == 3 and trainer.global_step == 6
        assert len(warnings) == 4, warnings  # three epoch saves and the final one
        assert all("access denied" in w for w in warnings)
    else:
        assert trainer.epoch == 1 and warnings == []
    assert policy.sleeps == []  # a 403 is never retried
    report(f"[fail-fast] training loop, on_save_error={on_save_error}: {trainer.global_step} steps trained, "
           f"{len(writes)} refused writes, {len(warnings)} warnings, "
           f"{'finished' if trainer.epoch == 3 else 'stopped at the first failed save'}")


def test_async_warn_a_failed_save_does_not_cost_the_next_one(caplog):
    """With async saves, a background failure surfaces at the next save; that save must still happen
    (an earlier version raised the old error in its place, so one failure cost two checkpoints)."""
    from cloudckpt.storage.faults import Fault

    store = FaultyStorage(MemoryStorage(), [Fault("put", key_prefix="checkpoint_epoch_0001.ckpt", kind="permanent")])
    manager = CheckpointManager(store, monitor="val_loss", async_save=True)
    callback = CheckpointCallback(None, manager=manager, on_save_error="warn", save_frequency=1)
    with caplog.at_level(logging.WARNING, logger="cloudckpt"):
        _trainer(callback, epochs=3).fit()
    names = [i.name for i in CheckpointManager(store.inner).list()]
    assert names == ["checkpoint_epoch_0002.ckpt", "checkpoint_epoch_0003.ckpt"], names
    warnings = [r.getMessage() for r in caplog.records if "training continues" in r.getMessage()]
    assert len(warnings) == 1 and "checkpoint_epoch_0001.ckpt" in warnings[0], warnings
    report("[fail-fast] async save + warn: 1 background save refused, the next 2 committed, 1 warning naming it")
