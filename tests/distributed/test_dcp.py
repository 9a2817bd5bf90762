"""torch.distributed.checkpoint over cloudckpt storage: CloudStorageWriter / CloudStorageReader.

Single-process tests (``no_dist``) cover the format, pickle policy, commit and
verification; two-rank gloo runs (subprocesses, see dist_worker.py) cover
sharded saves to S3 (moto) and a local directory, resharding, async_save and a
failing rank.

Resharding here means: the checkpoint's shard layout and the loader's differ.
2 ranks save DTensors sharded by rows (Shard(0)) and load them sharded by
columns (Shard(1)); one process loads the same checkpoint into plain full
tensors (2 -> 1); 2 ranks load a checkpoint one process saved (1 -> 2).  DCP's
planner computes which stored block overlaps which destination block; the
reader serves any block of any stored shard.
"""

from __future__ import annotations

import json
import pickle
from dataclasses import dataclass, replace

import pytest
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from dist_helpers import SMALL_CHUNKS, dcp_full_state, run_ranks
from torch.distributed.checkpoint.api import CheckpointException

from cloudckpt.errors import AlreadyExists, CorruptCheckpoint
from cloudckpt.format.serialize import PickleNotAllowed
from cloudckpt.integrations._dcp_metadata import decode_metadata
from cloudckpt.integrations.dcp import (
    METADATA_KEY,
    CloudStorageReader,
    CloudStorageWriter,
)
from cloudckpt.storage import MemoryStorage, open_storage
from cloudckpt.storage.faults import Fault, FaultyStorage

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")


@dataclass
class Custom:
    """A value only a full unpickler can rebuild."""

    value: int


def _tensors(state):
    return {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}


def _zeros(state):
    return {k: torch.zeros_like(v) for k, v in _tensors(state).items()}


def _failure(exc: BaseException) -> BaseException:
    """The exception a rank raised inside DCP (DCP wraps them in a CheckpointException)."""
    assert isinstance(exc, CheckpointException), exc
    (first, _trace), *_ = exc.failures.values()
    return first


def _save(state, where, **kwargs):
    dcp.save(state, storage_writer=CloudStorageWriter(where, **kwargs), no_dist=True)


def _load(state, where, **kwargs):
    dcp.load(state, storage_reader=CloudStorageReader(where, **kwargs), no_dist=True)


# -- one process ---------------------------------------------------------------

#: Every read and verify path runs on plain and on zstd-compressed chunks.
COMPRESSIONS = pytest.mark.parametrize("compression", ["none", "zstd"])


@COMPRESSIONS
def test_roundtrip_local_packs_splits_and_verifies(tmp_path, compression):
    g = torch.Generator().manual_seed(0)
    state = {
        "big": torch.randn(300, 100, generator=g),  # 120 KB: cut into two 64 KiB chunks
        "half": torch.randn(33, generator=g).half(),
        "bf16": torch.randn(5, 5, generator=g).bfloat16(),
        "ints": torch.arange(10),
        "flags": torch.tensor([True, False]),
        "view": torch.randn(6, 8, generator=g)[:, ::2],  # non-contiguous: only the projection is saved
        "nested": {"layer": {"weight": torch.randn(4, 4, generator=g)}},
        "empty": torch.empty(0, 3),
    }
    _save(state, tmp_path / "ck", transfer=replace(SMALL_CHUNKS, compression=compression))
    body = json.loads((tmp_path / "ck" / METADATA_KEY).read_bytes())
    assert body["compression"] == compression
    assert len(body["chunks"]) == 3  # big x 2 + one pack of the small ones
    target = {**_zeros({k: v for k, v in state.items() if k != "nested"}),
              "nested": {"layer": {"weight": torch.zeros(4, 4)}}}
    _load(target, tmp_path / "ck", full_verify=True)
    for key in ("big", "half", "bf16", "ints", "flags", "view", "empty"):
        assert torch.equal(target[key], state[key]), key
    assert torch.equal(target["nested"]["layer"]["weight"], state["nested"]["layer"]["weight"])


def _make_store(kind: str, request, tmp_path):
    if kind == "memory":
        return MemoryStorage()
    if kind == "local":
        return open_storage(str(tmp_path / "root"))
    if kind == "s3":
        server = request.getfixturevalue("moto_s3")
        return open_storage(f"s3://{server.new_bucket()}/runs/step-1", endpoint_url=server.endpoint_url)
    from gcs_helpers import drain_server_log

    server = request.getfixturevalue("fake_gcs")
    drain_server_log(server)
    return open_storage(f"gs://{server.new_bucket()}/runs/step-1", endpoint_url=server.endpoint_url)


@COMPRESSIONS
@pytest.mark.parametrize("kind", ["memory", "local", "s3", "gcs"])
def test_roundtrip_and_create_only_commit_on_every_backend(kind, request, tmp_path, compression):
    store = _make_store(kind, request, tmp_path)
    g = torch.Generator().manual_seed(3)
    state = {"big": torch.randn(300, 100, generator=g), "small": torch.randn(7, generator=g), "step": 3}
    transfer = replace(SMALL_CHUNKS, compression=compression)
    dcp.save(state, storage_writer=CloudStorageWriter(store, transfer=transfer), no_dist=True)
    target = {"big": torch.zeros(300, 100), "small": torch.zeros(7), "step": 0}
    dcp.load(target, storage_reader=CloudStorageReader(store, allow_pickle="weights_only", full_verify=True),
             no_dist=True)
    assert torch.equal(target["big"], state["big"]) and torch.equal(target["small"], state["small"])
    assert target["step"] == 3
    with pytest.raises(CheckpointException) as caught:
        dcp.save({"small": torch.zeros(7)}, storage_writer=CloudStorageWriter(store), no_dist=True)
    assert isinstance(_failure(caught.value), AlreadyExists)
    store.close()


def test_metadata_is_json_and_loads_without_pickle(tmp_path, monkeypatch):
    state = {"w": torch.randn(3, 4), "step": 5}
    _save(state, tmp_path / "ck")
    raw = (tmp_path / "ck" / METADATA_KEY).read_bytes()
    body = json.loads(raw)  # the whole object is JSON ...
    assert body["format"] == "cloudckpt-dcp" and body["pickled"] == ["step"]
    assert not raw.startswith(b"\x80") and b"\x80\x04" not in raw and b"\x80\x05" not in raw
    assert {o.key for o in open_storage(str(tmp_path / "ck")).list() if not o.key.startswith("chunks/")} == {METADATA_KEY}

    def refuse(*args, **kwargs):
        raise AssertionError("something unpickled while loading tensors")

    # ... and loading the tensors neither unpickles the metadata nor torch.loads anything.
    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(pickle, "Unpickler", refuse)
    monkeypatch.setattr(torch, "load", refuse)
    target = {"w": torch.zeros(3, 4)}
    _load(target, tmp_path / "ck")
    assert torch.equal(target["w"], state["w"])


def test_pickled_items_are_refused_unless_allowed(tmp_path):
    _save({"w": torch.ones(2), "step": 5, "note": "hello", "obj": Custom(3)}, tmp_path / "ck")

    with pytest.raises(CheckpointException) as caught:
        _load({"w": torch.zeros(2), "step": 0}, tmp_path / "ck")
    assert isinstance(_failure(caught.value), PickleNotAllowed)
    assert "step" in str(_failure(caught.value))

    plain = {"w": torch.zeros(2), "step": 0, "note": ""}
    _load(plain, tmp_path / "ck", allow_pickle="weights_only")
    assert plain["step"] == 5 and plain["note"] == "hello" and torch.equal(plain["w"], torch.ones(2))

    with pytest.raises(CheckpointException) as caught:
        _load({"obj": None}, tmp_path / "ck", allow_pickle="weights_only")
    assert isinstance(_failure(caught.value), PickleNotAllowed)

    trusted = {"obj": None}
    _load(trusted, tmp_path / "ck", allow_pickle=True)
    assert trusted["obj"] == Custom(3)


def test_commit_is_create_only(tmp_path):
    _save({"w": torch.ones(3)}, tmp_path / "ck")
    before = (tmp_path / "ck" / METADATA_KEY).read_bytes()
    with pytest.raises(CheckpointException) as caught:
        _save({"w": torch.zeros(3)}, tmp_path / "ck")
    assert isinstance(_failure(caught.value), AlreadyExists)
    assert (tmp_path / "ck" / METADATA_KEY).read_bytes() == before
    target = {"w": torch.zeros(3)}
    _load(target, tmp_path / "ck")
    assert torch.equal(target["w"], torch.ones(3))


@pytest.mark.parametrize("fault", [
    Fault("put", kind="permanent", key_prefix="chunks/", nth=2),  # a data upload fails
    Fault("put", kind="permanent", key_prefix=METADATA_KEY),  # the commit itself fails
    Fault("put", kind="crash_before", key_prefix=METADATA_KEY),  # the process "dies" before the commit
])
def test_failed_save_commits_nothing(fault):
    inner = MemoryStorage()
    g = torch.Generator().manual_seed(1)
    state = {f"t{i}": torch.randn(5000, generator=g) for i in range(4)}  # 20 KB each: own chunks
    with pytest.raises(CheckpointException):  # DCP wraps each rank's error, even a SimulatedCrash
        dcp.save(state, storage_writer=CloudStorageWriter(FaultyStorage(inner, [fault]), transfer=SMALL_CHUNKS),
                 no_dist=True)
    assert not [o.key for o in inner.list() if not o.key.startswith("chunks/")]
    with pytest.raises(CheckpointException) as caught:
        dcp.load(_zeros(state), storage_reader=CloudStorageReader(inner), no_dist=True)
    assert "no committed DCP checkpoint" in str(caught.value)
    # A retry writes the same content-addressed chunks again and commits.
    dcp.save(state, storage_writer=CloudStorageWriter(inner, transfer=SMALL_CHUNKS), no_dist=True)
    target = _zeros(state)
    dcp.load(target, storage_reader=CloudStorageReader(inner), no_dist=True)
    assert all(torch.equal(target[k], state[k]) for k in state)


@COMPRESSIONS
def test_damaged_chunk_is_detected_and_named(tmp_path, compression):
    state = {"a": torch.randn(3000), "b": torch.randn(3000)}
    _save(state, tmp_path / "ck", transfer=replace(SMALL_CHUNKS, compression=compression))
    body = json.loads((tmp_path / "ck" / METADATA_KEY).read_bytes())
    key = body["chunks"][0]["key"]
    path = tmp_path / "ck" / key
    data = bytearray(path.read_bytes())
    data[100] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointException) as caught:
        _load(_zeros(state), tmp_path / "ck")
    error = _failure(caught.value)
    assert isinstance(error, CorruptCheckpoint) and key in str(error) and "CRC32C" in str(error)

    path.unlink()  # missing: found by the HEAD pass, before any destination is written
    target = {"a": torch.full((3000,), 9.0), "b": torch.full((3000,), 9.0)}
    with pytest.raises(CheckpointException) as caught:
        _load(target, tmp_path / "ck")
    assert isinstance(_failure(caught.value), CorruptCheckpoint) and "missing" in str(_failure(caught.value))
    assert bool((target["a"] == 9).all()) and bool((target["b"] == 9).all())


def test_tampered_or_foreign_metadata_is_refused(tmp_path):
    _save({"w": torch.ones(3)}, tmp_path / "ck")
    path = tmp_path / "ck" / METADATA_KEY
    body = json.loads(path.read_bytes())
    body["items"][0]["segments"][0][3] += 4  # claims more bytes, checksum not updated
    with pytest.raises(CorruptCheckpoint, match="checksum"):
        decode_metadata(json.dumps(body).encode(), "x")
    with pytest.raises(CorruptCheckpoint, match="not valid JSON"):
        decode_metadata(pickle.dumps({"a": 1}), "x")  # e.g. a FileSystemWriter .metadata: never unpickled
    body = json.loads(path.read_bytes())
    body["chunks"][0]["key"] = "../../etc/passwd"
    from cloudckpt.integrations._dcp_metadata import _canonical_sha256

    body["metadata_sha256"] = _canonical_sha256(body)
    with pytest.raises(CorruptCheckpoint, match="chunks/<hh>"):
        decode_metadata(json.dumps(body).encode(), "x")


def test_metadata_roundtrip_keeps_planner_data_and_shards(tmp_path):
    state = {"model": {"layers": [torch.ones(2), torch.zeros(3)]}, "step": 4}
    written = dcp.save(state, storage_writer=CloudStorageWriter(tmp_path / "ck"), no_dist=True)
    read = CloudStorageReader(tmp_path / "ck").read_metadata()
    assert read.planner_data == written.planner_data  # fqn -> path tuples, e.g. ("model", "layers", 0)
    assert read.planner_data["model.layers.0"] == ("model", "layers", 0)
    assert read.state_dict_metadata == written.state_dict_metadata
    assert set(read.storage_data) == set(written.storage_data)
    assert read.storage_meta.checkpoint_id == written.storage_meta.checkpoint_id


def test_checkpoint_id_and_async_save_single_process(tmp_path):
    writer = CloudStorageWriter(tmp_path / "a")
    state = {"w": torch.randn(4, 4), "b": torch.arange(3)}
    dcp.save(state, checkpoint_id=str(tmp_path / "b"), storage_writer=writer, no_dist=True)
    future = dcp.async_save(state, checkpoint_id=str(tmp_path / "c"), storage_writer=writer, no_dist=True)
    future.result(timeout=60)
    for where in ("b", "c"):
        target = _zeros(state)
        dcp.load(target, checkpoint_id=str(tmp_path / where), storage_reader=CloudStorageReader(tmp_path / "a"),
                 no_dist=True)
        assert all(torch.equal(target[k], state[k]) for k in state)
    assert not (tmp_path / "a").exists()
    with pytest.raises(ValueError, match="Storage object"):  # a Storage object is one location: it cannot move
        dcp.save(state, checkpoint_id="elsewhere", storage_writer=CloudStorageWriter(MemoryStorage()), no_dist=True)


def test_refuses_use_collectives_false(tmp_path):
    with pytest.raises(ValueError, match="use_collectives"):
        CloudStorageWriter(tmp_path).set_up_storage_writer(True, rank=0, use_collectives=False)


# -- two ranks (gloo, subprocesses) ------------------------------------------------

def _keys(store) -> list[str]:
    return [o.key for o in store.list()]


@pytest.fixture(scope="module", params=["local", "s3"])
def two_ranks(request, tmp_path_factory):
    """One 2-rank launch per backend running three parts: 1 -> 2 load, 2-rank save (+ async, reshard), a failing rank."""
    if request.param == "s3":
        moto_s3 = request.getfixturevalue("moto_s3")
        bucket = moto_s3.new_bucket()
        base, options = f"s3://{bucket}/run", {"endpoint_url": moto_s3.endpoint_url}
    else:
        base, options = str(tmp_path_factory.mktemp("dcp")), {}
    urls = {name: f"{base}/{name}" for name in ("single", "step-100", "step-101", "failed")}
    _save(dcp_full_state(), urls["single"], storage_options=options, transfer=SMALL_CHUNKS)
    results = run_ranks("dcp", {
        "load": {"url": urls["single"], "options": options},
        "save": {"url": urls["step-100"], "options": options, "async_url": urls["step-101"]},
        "failure": {"url": urls["failed"], "options": options, "fail_rank": 1},
        "pg_timeout": 60,
    })
    for result in results:
        for part in result.values():
            assert "unexpected" not in part, part
    return results, urls, options


def test_two_ranks_save_then_reshard_on_load(two_ranks):
    results, urls, options = two_ranks
    for rank, result in enumerate(results):
        assert all(result["save"]["resharded_equal"].values()), (rank, result)  # rows -> columns, 2 ranks
        assert result["save"]["local_w_shape"] == [8, 3]  # column shards of an 8 x 6 tensor

    full = dcp_full_state()
    target = {**_zeros(full), "step": 0}  # 2 ranks -> 1 process, plain full tensors
    _load(target, urls["step-100"], storage_options=options, allow_pickle="weights_only")
    assert all(torch.equal(target[k], v) for k, v in _tensors(full).items())
    assert target["step"] == 7

    store = open_storage(urls["step-100"], **options)
    assert METADATA_KEY in _keys(store)
    body = json.loads(store.get(METADATA_KEY))
    shards: dict[str, list] = {}
    for item in body["items"]:
        shards.setdefault(item["fqn"], []).append(item["offset"])
    assert sorted(shards["w"]) == [[0, 0], [4, 0]] and sorted(shards["emb"]) == [[0, 0], [0, 2]]
    assert len(shards["bias"]) == 1 and shards["step"] == [None]  # replicated entries: written once
    assert len(body["chunks"]) > len(body["items"]) // 2  # big's shards were cut into chunks


def test_two_ranks_async_save(two_ranks):
    results, urls, options = two_ranks
    assert all(r["save"]["async_done"] for r in results)
    full = dcp_full_state()
    target = _zeros(full)
    _load(target, urls["step-101"], storage_options=options)
    assert all(torch.equal(target[k], v) for k, v in _tensors(full).items())


def test_one_process_save_loads_on_two_ranks(two_ranks):
    results, _, _ = two_ranks
    for result in results:
        part = result["load"]
        assert all(part["rows"].values()) and all(part["columns"].values()), part
        assert part["rows_local_w_shape"] == [4, 6] and part["columns_local_w_shape"] == [8, 3]


def test_failing_rank_commits_nothing_and_nobody_hangs(two_ranks):
    results, urls, options = two_ranks
    for result in results:
        part = result["failure"]
        assert part["error"] == "CheckpointException" and part["failed_ranks"] == [1], part
        assert part["causes"] == ["PermissionDenied"]  # rank 1's own error reached rank 0: not a timeout
    keys = _keys(open_storage(urls["failed"], **options))
    assert METADATA_KEY not in keys
    assert all(k.startswith("chunks/") for k in keys)  # rank 0's uploads: garbage, not a checkpoint
    with pytest.raises(CheckpointException, match="no committed DCP checkpoint"):
        _load(_zeros(dcp_full_state()), urls["failed"], storage_options=options)


def test_no_process_group_left_behind():
    assert not dist.is_initialized()
