"""What one steady-state save costs in requests and checksum work (issue 14's request target).

A save with retention on lists the root once: dedup, the live checkpoints, the pointers that
exist, retention, superseded manifests and the chunk sweep all share that one listing.  And
every uploaded byte is CRC32C'd once: the store sends the CRCs the uploader computed.
"""

from __future__ import annotations

import datetime as _dt
from collections import Counter

import pytest
import torch

from cloudckpt import CheckpointManager, KeepLastN, MemoryStorage, SweepConfig, TransferConfig
from cloudckpt import hashing
from cloudckpt.root_listing import RootListing
from cloudckpt.storage import open_storage
from cloudckpt.storage.faults import FaultyStorage

MiB = 1024 * 1024


class _Training:
    """A model and AdamW: every step changes every parameter and both moments."""

    def __init__(self, width: int = 64, layers: int = 3) -> None:
        torch.manual_seed(0)
        self.model = torch.nn.Sequential(*[torch.nn.Linear(width, width) for _ in range(layers)])
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-3)
        self.width = width

    def step(self) -> dict[str, object]:
        self.model(torch.randn(2, self.width)).sum().backward()
        self.optimizer.step()
        self.optimizer.zero_grad()
        return {"model": self.model, "optimizer": self.optimizer}


def _steady_state_calls(mgr: CheckpointManager, count: callable, saves: int = 6, **save_kwargs) -> list[Counter]:
    training = _Training()
    per_save = []
    for step in range(saves):
        before = Counter(count())
        mgr.save(training.step(), step=step, metrics={"loss": 1.0 / (step + 1)}, **save_kwargs)
        per_save.append(Counter(count()) - before)
    return per_save[3:]  # past the first saves, retention removes one checkpoint per save


@pytest.mark.parametrize("monitor", [None, "loss"])
def test_a_steady_state_save_lists_the_root_once(monitor):
    store = FaultyStorage(MemoryStorage())
    mgr = CheckpointManager(store, retention=KeepLastN(2), monitor=monitor, capture_rng=False)
    for calls in _steady_state_calls(mgr, lambda: store.counts):
        assert calls["list"] == 1, calls
        assert calls["head"] == 0, calls  # compare-and-swaps read the token with the body
        assert calls["list_pending_uploads"] == 0, calls  # listed by the first prune only
    assert len(mgr.list()) == 2


def test_retention_with_one_listing_keeps_its_promises():
    """Pins and pointers still protect, superseded checkpoints still protect their chunks, and a
    chunk only goes after the grace period, with the one listing per save."""
    clock = [_dt.datetime(2026, 1, 1, tzinfo=_dt.timezone.utc)]
    store = FaultyStorage(MemoryStorage(clock=lambda: clock[0]))
    mgr = CheckpointManager(store, retention=KeepLastN(1), capture_rng=False,
                            cleanup=SweepConfig(grace=_dt.timedelta(hours=1), clock=lambda: clock[0]))
    training = _Training()
    for step in range(2):
        mgr.save(training.step(), step=step)
    mgr.pin("checkpoint_step_00000001.ckpt")
    mgr.save(training.step(), step=2)
    state = training.step()
    mgr.save(state, step=3)
    assert [i.step for i in mgr.list()] == [1, 3]  # step 1 pinned, step 3 the newest
    mgr.restore(state, which=1)
    mgr.save(training.step(), step=2, name="forked_step_2.ckpt")  # forks: step 3 is superseded
    assert [i.step for i in mgr.list()] == [1, 2]
    superseded = [i for i in mgr.list(superseded=True) if i.superseded]
    assert [i.step for i in superseded] == [3]
    clock[0] += _dt.timedelta(hours=3)
    mgr.save(training.step(), step=4)
    clock[0] += _dt.timedelta(hours=3)
    mgr.save(training.step(), step=5)  # step 2 (and 4) went; their own chunks are garbage now
    for info in mgr.list(superseded=True):  # superseded ones too: every chunk is still there
        mgr.verify(info.name)
    referenced = {c.key for i in mgr.list(superseded=True) for c in mgr.manifest(i.name).chunks}
    chunks = {i.key for i in store.inner.list("chunks/")}
    uploaded = {key for verb, key in store.calls if verb == "put" and key.startswith("chunks/")}
    assert referenced <= chunks < uploaded  # the garbage older than the grace period went


def test_a_steady_state_save_to_s3_sends_one_list_request(moto_s3):
    """On S3 (moto's HTTP server): one ListObjectsV2 per steady-state save with retention."""
    bucket = moto_s3.new_bucket()
    store = open_storage(f"s3://{bucket}/run", endpoint_url=moto_s3.endpoint_url)
    operations: Counter[str] = Counter()
    store.inner._client.meta.events.register("before-call.s3", lambda model, **_: operations.update([model.name]))
    with CheckpointManager(store, retention=KeepLastN(2), monitor="loss", capture_rng=False) as mgr:
        per_save = _steady_state_calls(mgr, lambda: operations)
    for calls in per_save:
        assert calls["ListObjectsV2"] == 1, calls
        assert calls["HeadObject"] == 0, calls
        assert calls["ListMultipartUploads"] == 0, calls


def test_every_uploaded_byte_is_checksummed_once(moto_s3, monkeypatch):
    """The uploader's CRC32Cs go to S3 (parts and single PUTs); none is computed twice."""
    checksummed = [0]
    real = hashing.google_crc32c

    class Counting:
        @staticmethod
        def value(data) -> int:
            checksummed[0] += memoryview(data).nbytes
            return real.value(data)

    monkeypatch.setattr(hashing, "google_crc32c", Counting)
    bucket = moto_s3.new_bucket()
    transfer = TransferConfig(chunk_size=16 * MiB, multipart_threshold=6 * MiB, part_size=5 * MiB)
    state = {"big": torch.randn(3 * MiB), "small": torch.randn(1000)}  # 12 MiB: three parts of one chunk
    with CheckpointManager(f"s3://{bucket}/run", transfer=transfer, capture_rng=False,
                           storage_options={"endpoint_url": moto_s3.endpoint_url}) as mgr:
        info = mgr.save(state, step=1)
        uploaded = info.stats.bytes_uploaded
        checksummed[0] = 0
        mgr.save({k: v + 1 for k, v in state.items()}, step=2)
        restored = {"big": torch.zeros(3 * MiB), "small": torch.zeros(1000)}
    assert uploaded >= 12 * MiB
    assert uploaded <= checksummed[0] <= uploaded + 256 * 1024, (checksummed[0], uploaded)
    with CheckpointManager(f"s3://{bucket}/run", storage_options={"endpoint_url": moto_s3.endpoint_url}) as mgr:
        mgr.restore(restored)
    assert torch.equal(restored["big"], state["big"] + 1)


def test_crc32c_combine_matches_the_crc_of_the_concatenation():
    rng = torch.Generator().manual_seed(3)
    for first_size, second_size in [(0, 0), (1, 0), (0, 7), (13, 1), (4096, 5 * MiB + 3), (5 * MiB, 1)]:
        first = torch.randint(0, 256, (first_size,), dtype=torch.uint8, generator=rng).numpy().tobytes()
        second = torch.randint(0, 256, (second_size,), dtype=torch.uint8, generator=rng).numpy().tobytes()
        combined = hashing.crc32c_combine(hashing.crc32c(first), hashing.crc32c(second), len(second))
        assert combined == hashing.crc32c(first + second), (first_size, second_size)



def test_a_manifest_moved_aside_after_the_listing_still_protects_its_chunks():
    """The sweep reads manifests named by a listing taken earlier (a save's, before its upload);
    one that another writer's rollback moved under superseded/ meanwhile is found there."""
    store = MemoryStorage()
    no_grace = SweepConfig(grace=_dt.timedelta(0))
    writer = CheckpointManager(store, capture_rng=False)
    training = _Training()
    for step in (1, 2):
        writer.save(training.step(), step=step)
    listing = RootListing.take(store, recursive=True)
    CheckpointManager(store, capture_rng=False).rollback(1)  # step 2 moves under superseded/
    sweeper = CheckpointManager(store, capture_rng=False, cleanup=no_grace)
    report = sweeper.prune_with(listing)
    assert report.chunks_removed == 0
    sweeper.verify("checkpoint_step_00000002.ckpt")  # the superseded checkpoint: every chunk is there
