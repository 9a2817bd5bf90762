"""A crafted manifest cannot make a reader allocate more than its chunks hold (issue 12, item 4).

The reproduction of the issue: a 2.6 MiB manifest whose ~50 000 tensors all map the same 4 KiB
chunk made ``load()`` allocate 195 MiB (at the manifest size cap, ~19 GiB).  One validator
(``cloudckpt.format.layout.check_layout``) refuses it, in the manifest parser and in the DCP
metadata decoder, before anything is read or allocated.
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.distributed.checkpoint as dcp

from cloudckpt import CheckpointManager, CorruptCheckpoint, MemoryStorage
from cloudckpt.format.manifest import canonical_sha256, parse_manifest
from cloudckpt.integrations._dcp_metadata import METADATA_KEY, _canonical_sha256, decode_metadata
from cloudckpt.integrations.dcp import CloudStorageReader, CloudStorageWriter

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
NAME = "checkpoint_step_00000001.ckpt"
COPIES = 50_000


def _peak_kib() -> int:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmHWM:"))


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as refs:
        refs.write("5")


def _crafted_root() -> MemoryStorage:
    """One real 4 KiB chunk, and a manifest whose 195 MiB tensor is 50 000 copies of that chunk's bytes."""
    store = MemoryStorage()
    CheckpointManager(store, capture_rng=False).save({"w": torch.randn(1024)}, step=1)
    body = json.loads(store.get(NAME))
    (tensor,) = body["tensors"]
    tensor["shape"], tensor["nbytes"] = [1024 * COPIES], 4096 * COPIES
    tensor["segments"] = [[0, 0, 4096 * i, 4096] for i in range(COPIES)]
    body["manifest_sha256"] = canonical_sha256(body)
    raw = json.dumps(body, separators=(",", ":")).encode()
    assert len(raw) < 4 * 2**20 and body["chunks"][0]["size"] == 4096
    store.put(NAME, raw)
    return store


def test_the_issue_reproduction_is_refused_before_anything_is_allocated():
    store = _crafted_root()
    with pytest.raises(CorruptCheckpoint, match="may not overlap"):
        parse_manifest(store.get(NAME), "crafted")
    _reset_peak()
    before = _peak_kib()
    with pytest.raises(CorruptCheckpoint, match="may not overlap"):
        CheckpointManager(store, capture_rng=False).load(NAME)
    grown = _peak_kib() - before
    assert grown < 64 * 1024, f"load() grew the peak RSS by {grown} KiB for a 4 KiB chunk"


def test_tensors_whose_sizes_do_not_add_up_to_their_segments_are_refused():
    from cloudckpt.format.layout import check_layout
    from cloudckpt.format.serialize import Segment

    with pytest.raises(CorruptCheckpoint, match="declare 8 bytes, their segments hold 4"):
        check_layout([(8, [Segment(0, 0, 0, 4)])], "crafted")
    check_layout([(4, [Segment(0, 0, 0, 4)]), (4, [Segment(0, 4, 0, 4)])], "packed")  # disjoint: fine


def _dcp_root(state: dict) -> MemoryStorage:
    store = MemoryStorage()
    dcp.save(state, storage_writer=CloudStorageWriter(store), no_dist=True)
    return store


def test_dcp_metadata_mapping_one_chunk_many_times_is_refused():
    store = _dcp_root({f"t{i}": torch.randn(256) for i in range(4)})
    body = json.loads(store.get(METADATA_KEY))
    first = body["items"][0]
    for item in body["items"][1:]:  # every item now takes the first item's bytes
        item["segments"] = [list(s) for s in first["segments"]]
    body["metadata_sha256"] = _canonical_sha256(body)
    with pytest.raises(CorruptCheckpoint, match="may not overlap"):
        decode_metadata(json.dumps(body).encode(), "crafted")


def test_identical_dcp_items_still_load():
    """Items with identical bytes dedup to one stored chunk; the writer gives each its own chunk entry."""
    zeros = torch.zeros(300_000)  # over the pack threshold: a chunk of its own, twice the same content
    state = {"a": zeros.clone(), "b": zeros.clone(), "c": torch.randn(10)}
    store = _dcp_root(state)
    body = json.loads(store.get(METADATA_KEY))
    keys = [c["key"] for c in body["chunks"]]
    assert len(keys) > len(set(keys)), "the identical items should share a stored chunk"
    target = {"a": torch.ones(300_000), "b": torch.ones(300_000), "c": torch.zeros(10)}
    dcp.load(target, storage_reader=CloudStorageReader(store), no_dist=True)
    assert all(torch.equal(target[k], state[k]) for k in state)


def test_identical_tensors_in_one_checkpoint_still_restore():
    store = MemoryStorage()
    state = {"a": torch.zeros(300_000), "b": torch.zeros(300_000)}
    CheckpointManager(store, capture_rng=False).save(state, step=1)
    loaded, _ = CheckpointManager(store, capture_rng=False).load()
    assert torch.equal(loaded["a"], state["a"]) and torch.equal(loaded["b"], state["b"])
