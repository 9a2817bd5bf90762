"""DistributedCheckpointManager: every rank stores its part, rank 0 commits one manifest listing the parts.

Two-rank runs are gloo subprocesses (dist_worker.py); the in-process tests use a
one-rank gloo group, which exercises the same code paths quickly.
"""

from __future__ import annotations

import datetime
import json

import pytest
import torch
import torch.distributed as dist
from dist_helpers import SMALL_CHUNKS, rank_shard, replicated_model, run_ranks

from cloudckpt import CheckpointManager
from cloudckpt.distributed import (
    CONFIG_KEY,
    RANKS_KEY,
    DistributedCheckpointError,
    DistributedCheckpointManager,
    WorldSizeMismatch,
)
from cloudckpt.errors import CorruptCheckpoint
from cloudckpt.format.manifest import canonical_sha256
from cloudckpt.reader import load_manifest
from cloudckpt.sharding.whole import with_part_chunks
from cloudckpt.state import RNG_KEY
from cloudckpt.storage import MemoryStorage, open_storage
from cloudckpt.storage.faults import Fault, FaultyStorage


@pytest.fixture
def one_rank():
    """A one-process gloo group, torn down after the test (DCP tests must not see it)."""
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


# -- two ranks ---------------------------------------------------------------------

@pytest.fixture(scope="module", params=["local", "s3"])
def two_ranks(request, tmp_path_factory):
    if request.param == "s3":
        moto_s3 = request.getfixturevalue("moto_s3")
        bucket = moto_s3.new_bucket()
        base, options = f"s3://{bucket}", {"endpoint_url": moto_s3.endpoint_url}
    else:
        base, options = str(tmp_path_factory.mktemp("dist")), {}
    urls = {"roundtrip": f"{base}/roundtrip", "failure": f"{base}/failure"}
    results = run_ranks("manager", {
        "roundtrip": {"url": urls["roundtrip"], "options": options},
        "failure": {"url": urls["failure"], "options": options, "fail_rank": 1},
        "pg_timeout": 60,
    })
    for result in results:
        for part in result.values():
            assert "unexpected" not in part, part
    return results, urls, options


def test_two_ranks_save_and_restore(two_ranks):
    results, _, _ = two_ranks
    for rank, result in enumerate(results):
        part = result["roundtrip"]
        assert part["first"][0] == "checkpoint_step_00000010.ckpt"
        assert sorted(part["first"][1]) == ["best_model_loss.ckpt", "latest.ckpt"]
        assert part["latest_step"] == 20 and all(part["latest_ok"].values()), (rank, part)
        assert part["best_step"] == 10 and all(part["best_ok"].values()), (rank, part)  # incl. this rank's RNG
        # The unchanged replicated model was not uploaded again; the new shards were.
        assert part["second_stats"]["chunks_reused"] >= 1 and part["second_stats"]["chunks_uploaded"] >= 2


def test_one_process_reads_a_two_rank_checkpoint_whole(two_ranks):
    _, urls, options = two_ranks
    with CheckpointManager(urls["roundtrip"], storage_options=options) as mgr:
        assert [i.step for i in mgr.list()] == [10, 20]
        assert mgr.verify("latest").chunks_read > 0
        loaded, info = mgr.load()
    assert info.step == 20
    expected, _ = replicated_model()
    assert torch.equal(loaded["model"]["weight"], expected.weight)  # replicated: stored once, at the top
    ranks = loaded[RANKS_KEY]
    assert len(ranks) == 2
    for rank in range(2):
        assert torch.equal(ranks[rank]["shard"], rank_shard(rank, 2))
        assert ranks[rank]["progress"] == {"rank": rank, "seen": 20}
        assert RNG_KEY in ranks[rank]
    model = torch.nn.Linear(16, 8)  # one process can restore the replicated part on its own
    with CheckpointManager(urls["roundtrip"], storage_options=options) as mgr:
        mgr.restore({"model": model}, keys=["model"])
    assert torch.equal(model.weight, expected.weight)


def test_failing_rank_commits_nothing_and_everyone_raises(two_ranks):
    results, urls, options = two_ranks
    for result in results:
        part = result["failure"]
        assert part["error"] == "DistributedCheckpointError" and part["failed_ranks"] == [1], part
        assert "PermissionDenied" in part["message"]
        assert part["latest_after_failure"] == 1  # the previous checkpoint is still the latest
        assert part["third"] == 3  # and the group goes on saving
    store = open_storage(urls["failure"], **options)
    manifests = sorted(o.key for o in store.list() if o.key.endswith(".ckpt") and "/" not in o.key)
    assert manifests == ["checkpoint_step_00000001.ckpt", "checkpoint_step_00000003.ckpt", "latest.ckpt"]


def test_dead_rank_fails_the_others_instead_of_hanging(tmp_path):
    results = run_ranks("manager_crash", {"url": str(tmp_path / "crash"), "fail_rank": 1, "crash": True,
                                          "pg_timeout": 30}, may_die=(1,))
    part = results[0]
    assert results[1] is None  # rank 1 died
    assert part["error"] is not None, part  # gloo reports the lost peer (or the timeout): no hang
    names = sorted(p.name for p in (tmp_path / "crash").iterdir() if p.name.endswith(".ckpt"))
    assert names == ["checkpoint_step_00000001.ckpt", "latest.ckpt"]


def test_world_size_mismatch_is_refused(two_ranks, one_rank):
    _, urls, options = two_ranks
    mgr = DistributedCheckpointManager(urls["roundtrip"], storage_options=options)
    with pytest.raises(DistributedCheckpointError, match=r"\['shard'\] were saved per rank by 2 ranks") as caught:
        mgr.restore({"shard": torch.zeros(3000)})
    assert isinstance(caught.value.__cause__, WorldSizeMismatch)


# -- one rank, in process --------------------------------------------------------

def test_one_rank_roundtrip_and_manifest_layout(one_rank):
    store = MemoryStorage()
    model, _ = replicated_model()
    mgr = DistributedCheckpointManager(store, replicated=["model"], config={"lr": 0.1})
    info = mgr.save({"model": model, "extra": {"n": 1, "t": torch.ones(2)}}, step=3, metrics={"loss": 2.0})
    assert info.name == "checkpoint_step_00000003.ckpt" and info.pointers == ("latest.ckpt",)
    manifest = load_manifest(store, info.name)
    assert manifest.config == {"lr": 0.1, CONFIG_KEY: {"world_size": 1, "replicated": ["model"],
                                                       "resharded": {"model": "module"}, "per_rank": ["extra"]}}
    assert manifest.format_version == 3 and manifest.tensors == [] and len(manifest.parts) == 1
    part_keys = [o.key for o in store.list("parts/")]
    assert part_keys == [manifest.parts[0].key(info.name)]
    assert part_keys[0].startswith(f"parts/{manifest.parts[0].sha256[:2]}/{info.name}/r00000-")
    target = {"model": torch.nn.Linear(16, 8), "extra": {}}
    assert mgr.restore(target).step == 3
    assert torch.equal(target["model"].weight, model.weight)
    assert target["extra"]["n"] == 1 and torch.equal(target["extra"]["t"], torch.ones(2))


def test_one_rank_fallback_to_previous_on_corruption(one_rank):
    store = MemoryStorage()
    mgr = DistributedCheckpointManager(store, transfer=SMALL_CHUNKS)
    mgr.save({"shard": rank_shard(0, 1)}, step=1)
    mgr.save({"shard": rank_shard(0, 2)}, step=2)
    second = with_part_chunks(store, load_manifest(store, "checkpoint_step_00000002.ckpt"))
    first_keys = {c.key for c in with_part_chunks(store, load_manifest(store, "checkpoint_step_00000001.ckpt")).chunks}
    store.delete([c.key for c in second.chunks if c.key not in first_keys])
    target = {"shard": torch.zeros(3000)}
    assert mgr.restore(target).step == 1
    assert torch.equal(target["shard"], rank_shard(0, 1))
    with pytest.raises(DistributedCheckpointError) as caught:  # asked for by name: no fallback
        mgr.restore(target, "checkpoint_step_00000002.ckpt")
    assert isinstance(caught.value.__cause__, CorruptCheckpoint)


def test_one_rank_failed_upload_commits_nothing(one_rank):
    inner = MemoryStorage()
    faulty = FaultyStorage(inner, [Fault("put", kind="permanent", key_prefix="chunks/")])
    mgr = DistributedCheckpointManager(faulty)
    with pytest.raises(DistributedCheckpointError, match="rank 0: PermissionDenied"):
        mgr.save({"t": torch.ones(4)}, step=1)
    assert not [o.key for o in inner.list() if o.key.endswith(".ckpt")]
    assert mgr.restore({"t": torch.zeros(4)}) is None
    assert mgr.save({"t": torch.ones(4)}, step=1).step == 1  # the fault fired once; a retry commits


def test_one_rank_rejects_reserved_and_missing_keys(one_rank):
    mgr = DistributedCheckpointManager(MemoryStorage(), replicated=["model"])
    with pytest.raises(DistributedCheckpointError, match="replicated keys"):
        mgr.save({"other": torch.ones(1)}, step=1)
    with pytest.raises(DistributedCheckpointError, match="reserved"):
        mgr.save({"model": torch.ones(1), RANKS_KEY: 1}, step=1)


def test_needs_an_initialized_process_group():
    with pytest.raises(RuntimeError, match="init_process_group"):
        DistributedCheckpointManager(MemoryStorage())


def test_checkpoints_of_earlier_releases_still_restore(one_rank):
    """Before parts, a distributed save was one ordinary manifest: replicated keys on top, each rank's
    tree under RANKS_KEY, format version 2: written here by a plain manager with that layout."""
    store = MemoryStorage()
    model, _ = replicated_model()
    with CheckpointManager(store, capture_rng=False,
                           config={CONFIG_KEY: {"world_size": 1, "replicated": ["model"]}}) as old:
        old.save({"model": model, RANKS_KEY: [{"shard": rank_shard(0, 1)}]}, step=7)
    body = json.loads(store.get("checkpoint_step_00000007.ckpt"))
    body["format_version"] = 2  # exactly what the earlier release wrote
    body["manifest_sha256"] = canonical_sha256(body)
    store.put("checkpoint_step_00000007.ckpt", json.dumps(body).encode())
    target = {"model": torch.nn.Linear(16, 8), "shard": torch.zeros(3000)}
    assert DistributedCheckpointManager(store, replicated=["model"]).restore(target).step == 7
    assert torch.equal(target["model"].weight, model.weight) and torch.equal(target["shard"], rank_shard(0, 1))


def test_dtensor_state(one_rank):
    """A DTensor: one process cannot save it (a clear error, not a crash); the distributed manager can."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    from cloudckpt.format.serialize import UnsupportedValue

    mesh = init_device_mesh("cpu", (1,))
    weight = distribute_tensor(torch.arange(12.0).reshape(4, 3), mesh, [Shard(0)])
    with pytest.raises(UnsupportedValue, match=r"state\[\"w\"\]: a DTensor .*DistributedCheckpointManager"):
        CheckpointManager(MemoryStorage()).save({"w": weight}, step=1)
    store = MemoryStorage()
    DistributedCheckpointManager(store).save({"w": weight, "step": 1}, step=1)
    target = {"w": distribute_tensor(torch.zeros(4, 3), mesh, [Shard(0)])}
    DistributedCheckpointManager(store).restore(target, keys=["w"])
    assert torch.equal(target["w"].full_tensor(), torch.arange(12.0).reshape(4, 3))
    loaded, _ = CheckpointManager(store).load()
    assert torch.equal(loaded["w"], torch.arange(12.0).reshape(4, 3))


def test_zombie_rank_from_before_a_preemption_changes_nothing(one_rank, moto_s3):
    """A rank of the old job that wakes up after the restart: its late save of a step already committed
    is refused (create-only), an older step never becomes latest (forward-only), and its stray part is
    unreferenced: the restart's checkpoint restores as committed."""
    url, options = f"s3://{moto_s3.new_bucket()}/run", {"endpoint_url": moto_s3.endpoint_url}
    restarted = DistributedCheckpointManager(url, storage_options=options, replicated=["w"])
    restarted.save({"w": torch.full((4,), 5.0)}, step=5)
    zombie = DistributedCheckpointManager(url, storage_options=options, replicated=["w"])
    with pytest.raises(DistributedCheckpointError, match="AlreadyExists") as caught:
        zombie.save({"w": torch.full((4,), -1.0)}, step=5)
    assert caught.value.failures.keys() == {0}
    assert zombie.save({"w": torch.full((4,), 3.0)}, step=3).pointers == ()  # committed, latest not moved
    store = open_storage(url, **options)
    assert len([o for o in store.list("parts/") if "checkpoint_step_00000005" in o.key]) == 2  # one stray
    target = {"w": torch.zeros(4)}
    assert restarted.restore(target).step == 5 and torch.equal(target["w"], torch.full((4,), 5.0))


def test_sweeper_keeps_what_parts_reference_and_removes_a_failed_save(one_rank):
    """Chunks are referenced only through parts: retention must read them before it sweeps."""
    from cloudckpt.retention import KeepLastN
    from cloudckpt.sweeper import SweepConfig

    inner = MemoryStorage()
    faulty = FaultyStorage(inner)
    mgr = DistributedCheckpointManager(faulty, retention=KeepLastN(1), cleanup=SweepConfig(grace=datetime.timedelta(0)),
                                       transfer=SMALL_CHUNKS)
    mgr.save({"shard": rank_shard(0, 1)}, step=1)
    faulty.faults.append(Fault("put", kind="permanent", key_prefix="checkpoint_"))  # the commit fails
    with pytest.raises(DistributedCheckpointError):
        mgr.save({"shard": rank_shard(0, 2)}, step=2)
    assert len(inner.list("parts/")) == 2  # step 2's part is garbage now
    mgr.save({"shard": rank_shard(0, 3)}, step=3)  # retention removes step 1, then sweeps
    names = [o.key for o in inner.list() if o.key.endswith(".ckpt") and "/" not in o.key]
    assert names == ["checkpoint_step_00000003.ckpt", "latest.ckpt"]
    parts = [o.key for o in inner.list("parts/")]
    assert len(parts) == 1 and "checkpoint_step_00000003" in parts[0]
    target = {"shard": torch.zeros(3000)}
    assert mgr.restore(target).step == 3 and torch.equal(target["shard"], rank_shard(0, 3))
    assert CheckpointManager(inner).verify().chunks_read >= 1


def test_state_the_checkpoint_lacks_is_an_error_not_a_fallback(one_rank):
    store = MemoryStorage()
    mgr = DistributedCheckpointManager(store, replicated=["w", "progress"])
    for step in (1, 2):
        mgr.save({"w": torch.ones(3), "progress": {"x": step}}, step=step)
    with pytest.raises(DistributedCheckpointError, match=r"checkpoint_step_00000002.*does not hold \['progress.y'\]"):
        mgr.restore({"w": torch.zeros(3), "progress": {"y": 0}})
