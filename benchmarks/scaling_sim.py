"""The commit path of DistributedCheckpointManager at 64, 1,024 and 8,192 ranks, simulated in one process.

Used by ``benchmarks/scaling.py --simulate``.  Each simulated rank holds the
FSDP shard of a Llama-2-70B-shaped model (80 layers, hidden 8192, MLP 28672,
grouped KV heads, vocabulary 32000: 723 parameters, 69 B values) with both
Adam moments: 2,169 sharded tensors per rank, plus the 723 step counters and
the parameter groups, which rank 0 writes.

What is real: the part of a rank is built by the library's own encoder from
DCP write items with the shapes, dtypes and chunk layout (``plan_chunks`` with
the default TransferConfig) of that rank's shard; the digests are the
library's own objects, pickled and unpickled as ``gather_object`` does; rank 0
runs the library's commit (``DistributedCheckpointManager._decide``: checks,
manifest, create-only PUT, pointers, run index) on a MemoryStorage that counts
requests.  What is simulated: the other ranks' parts are not encoded (their
size equals the sampled one's; FSDP shards evenly), and no tensor bytes move.
"""

from __future__ import annotations

import hashlib
import json
import math
import pickle
import time
import tracemalloc
from collections import Counter
from typing import Any

import torch
from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, MetadataIndex, TensorProperties
from torch.distributed.checkpoint.planner import TensorWriteData, WriteItem, WriteItemType

from cloudckpt import __version__
from cloudckpt.format.dtypes import TensorRecord
from cloudckpt.format.manifest import ChunkRef, Manifest, TensorEntry, chunk_key
from cloudckpt.format.parts import PartRef
from cloudckpt.format.serialize import Segment, plan_chunks
from cloudckpt.integrations._dcp_metadata import ItemLocation, encode_metadata
from cloudckpt.sharding.part import PART_FORMAT, PART_VERSION, _local_metadata
from cloudckpt.storage import MemoryStorage
from cloudckpt.storage.faults import FaultyStorage
from cloudckpt.transfer import TransferConfig

S3_PUT_PER_PREFIX = 3500
S3_GET_PER_PREFIX = 5500
MODEL = {"layers": 80, "hidden": 8192, "mlp": 28672, "kv": 1024, "vocab": 32000}


def llama70b_shapes() -> dict[str, tuple[int, ...]]:
    h, f, kv, v = MODEL["hidden"], MODEL["mlp"], MODEL["kv"], MODEL["vocab"]
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (v, h)}
    for i in range(MODEL["layers"]):
        p = f"model.layers.{i}."
        shapes.update({p + "self_attn.q_proj.weight": (h, h), p + "self_attn.k_proj.weight": (kv, h),
                       p + "self_attn.v_proj.weight": (kv, h), p + "self_attn.o_proj.weight": (h, h),
                       p + "mlp.gate_proj.weight": (f, h), p + "mlp.up_proj.weight": (f, h),
                       p + "mlp.down_proj.weight": (h, f), p + "input_layernorm.weight": (h,),
                       p + "post_attention_layernorm.weight": (h,)})
    shapes.update({"model.norm.weight": (h,), "lm_head.weight": (v, h)})
    return shapes


def _shard_rows(rows: int, world: int, rank: int) -> tuple[int, int]:
    """FSDP2's dim-0 split (torch.chunk): offset and length of ``rank``'s rows (0 rows past the end)."""
    per = math.ceil(rows / world)
    start = min(rows, per * rank)
    return start, min(rows, start + per) - start


def rank_items(world: int, rank: int) -> list[tuple[WriteItem, TensorRecord]]:
    """The DCP write items of one rank (fp32 parameter shards and both Adam moments; rank 0: the steps too)."""
    items = []
    for name, shape in llama70b_shapes().items():
        start, rows = _shard_rows(shape[0], world, rank)
        local = (rows, *shape[1:])
        for fqn in (f"model.{name}", f"optimizer.state.{name}.exp_avg", f"optimizer.state.{name}.exp_avg_sq"):
            offsets = torch.Size((start,) + (0,) * (len(shape) - 1))
            data = TensorWriteData(ChunkStorageMetadata(offsets, torch.Size(local)),
                                   TensorProperties(dtype=torch.float32), torch.Size(shape))
            items.append((WriteItem(MetadataIndex(fqn, offsets), WriteItemType.SHARD, tensor_data=data),
                          TensorRecord("float32", list(local), "cpu", 4 * math.prod(local))))
        if rank == 0:
            fqn = f"optimizer.state.{name}.step"
            data = TensorWriteData(ChunkStorageMetadata(torch.Size(()), torch.Size(())),
                                   TensorProperties(dtype=torch.float32), torch.Size(()))
            items.append((WriteItem(MetadataIndex(fqn, torch.Size(())), WriteItemType.TENSOR, tensor_data=data),
                          TensorRecord("float32", [], "cpu", 4)))
    return items


def encode_rank_part(world: int, rank: int, name: str, transfer: TransferConfig) -> dict[str, Any]:
    """Build and encode one rank's real part; return its bytes, chunk count and encode time."""
    pairs = rank_items(world, rank)
    records = [r for _, r in pairs]
    plan = plan_chunks(records, chunk_size=transfer.chunk_size, pack_threshold=transfer.pack_threshold,
                       pack_size=transfer.pack_size)
    refs = []
    for c in range(len(plan.chunks)):
        digest = hashlib.sha256(f"{world}/{rank}/{c}".encode()).hexdigest()  # stands in for BLAKE3
        size = plan.chunk_nbytes(c)
        refs.append(ChunkRef(chunk_key(digest), digest, size, "00000000", size))
    start = time.perf_counter()
    locations = []
    for (_, record), segments in zip(pairs, plan.segments):
        used: dict[int, int] = {}
        local = [Segment(used.setdefault(s.chunk_index, len(used)), s.chunk_offset, s.tensor_offset, s.length)
                 for s in segments]
        locations.append(ItemLocation("tensor", "float32", tuple(record.shape), record.nbytes,
                                      tuple(refs[c] for c in used), tuple(local)))
    items = [i for i, _ in pairs]
    metadata = _local_metadata(items, locations, {i.index.fqn: tuple(i.index.fqn.split(".", 1)) for i in items})
    rng = TensorEntry("uint8", (5056,), "cpu", 5056, (Segment(0, 0, 0, 5056),))
    own = Manifest(name=name, step=1000, epoch=None, reason="periodic", created="2026-12-07T00:00:00Z",
                   state={"_cloudckpt_rng": {"__state_dict__": {"torch": {"__tensor__": 0}}}}, tensors=[rng],
                   chunks=[refs[0]], library_version=__version__)
    body = {"format": PART_FORMAT, "format_version": PART_VERSION, "checkpoint": name, "rank": rank,
            "world_size": world, "dcp": json.loads(encode_metadata(metadata, compression="none",
                                                                  library_version=__version__)),
            "own": own.to_json()}
    data = json.dumps(body, separators=(",", ":")).encode()
    return {"bytes": data, "chunks": len(refs), "items": len(items), "encode_s": time.perf_counter() - start,
            "tensor_bytes": sum(r.nbytes for r in records)}


def legacy_entry_bytes(sample: dict[str, Any]) -> float:
    """Bytes per tensor of the previous design's single manifest (a TensorEntry with its chunk share)."""
    entry = TensorEntry("float32", (1, 8192), "cpu", 32768, (Segment(3, 123456, 0, 32768),))
    manifest = Manifest(name="x.ckpt", step=0, epoch=None, reason="manual", created="2026-12-07T00:00:00Z",
                        state={}, tensors=[entry] * 1000, chunks=[], library_version=__version__)
    base = Manifest(name="x.ckpt", step=0, epoch=None, reason="manual", created="2026-12-07T00:00:00Z",
                    state={}, tensors=[], chunks=[], library_version=__version__)
    per_tensor = (len(manifest.to_bytes()) - len(base.to_bytes())) / 1000
    chunk_json = 260  # one chunk record, as the v2 manifest writes it
    return per_tensor + 20 + chunk_json * sample["chunks"] / sample["items"]  # + its "__tensor__" tree node


def _digests(world: int, name: str, step: int, sample: dict[str, Any]) -> list[bytes]:
    """Every rank's digest as ``gather_object`` carries it (pickled), rank 0's from its real part."""
    from cloudckpt.distributed import _RankDigest
    from cloudckpt.writer import WriteStats

    sha0 = hashlib.sha256(sample["bytes"]).hexdigest()
    payloads = []
    for rank in range(world):
        sha = sha0 if rank == 0 else hashlib.sha256(f"{name}/{rank}/{sha0}".encode()).hexdigest()
        digest = _RankDigest(name=name, step=step, part=PartRef(rank, sha, len(sample["bytes"]), sample["tensor_bytes"]),
                             stats=WriteStats(chunks_uploaded=sample["chunks"]),
                             resharded={"model": "module", "optimizer": "optimizer"} if rank == 0 else {})
        payloads.append(pickle.dumps(digest.wire()))
    return payloads


def _rank0_commit(mgr: Any, payloads: list[bytes], step: int) -> None:
    from cloudckpt.distributed import _RankDigest

    gathered = [_RankDigest.from_wire(r, pickle.loads(p)) for r, p in enumerate(payloads)]
    outcome = mgr._decide(gathered, None, {"loss": 1.0 / step}, "periodic")
    assert not outcome.failures, outcome.failures


def commit_at(world: int, mgr: Any, store: FaultyStorage, sample: dict[str, Any], step: int,
              repeats: int = 3) -> dict[str, Any]:
    """Rank 0's side of a save at ``world`` ranks: receive the digests, commit, move pointers and the run
    index.  ``repeats`` saves timed (the median is reported), memory traced (tracemalloc slows it) in
    one more."""
    name = f"checkpoint_step_{step:08d}.ckpt"
    payloads = _digests(world, name, step, sample)
    before = len(store.calls)
    start = time.perf_counter()
    _rank0_commit(mgr, payloads, step)
    seconds = [time.perf_counter() - start]
    calls = store.calls[before:]
    for again in range(step + 1, step + 1 + repeats - 1):  # later saves of the same run, timed too
        more = _digests(world, f"checkpoint_step_{again:08d}.ckpt", again, sample)
        start = time.perf_counter()
        _rank0_commit(mgr, more, again)
        seconds.append(time.perf_counter() - start)
    traced = _digests(world, f"checkpoint_step_{step + repeats:08d}.ckpt", step + repeats, sample)
    tracemalloc.start()
    _rank0_commit(mgr, traced, step + repeats)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    keys = {PartRef(r, hashlib.sha256(f"{name}/{r}".encode()).hexdigest(), 0, 0).key(name).rsplit("/", 1)[0]
            for r in range(world)}
    return {"ranks": world, "manifest_bytes": len(store.inner.get(name)), "gather_bytes": sum(map(len, payloads)),
            "rank0_peak_bytes": peak, "commit_seconds": sorted(seconds)[len(seconds) // 2],
            "commit_seconds_all": seconds, "rank0_requests": len(calls),
            "rank0_requests_by_verb": dict(Counter(v for v, _ in calls)), "part_prefixes": len(keys)}


def simulate(worlds: tuple[int, ...] = (64, 1024, 8192)) -> dict[str, Any]:
    import torch.distributed as dist

    from cloudckpt.distributed import DistributedCheckpointManager

    transfer = TransferConfig()
    if not dist.is_initialized():
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    rows, per_rank = [], []
    for world in worlds:
        step = 1000
        sample0 = encode_rank_part(world, 0, f"checkpoint_step_{step:08d}.ckpt", transfer)
        sample1 = encode_rank_part(world, 1, f"checkpoint_step_{step:08d}.ckpt", transfer)
        store = FaultyStorage(MemoryStorage())  # a fresh root per size: the same commit work each time
        mgr = DistributedCheckpointManager(store, monitor="loss", mode="min", transfer=transfer)
        row = commit_at(world, mgr, store, sample0, step)
        legacy = legacy_entry_bytes(sample1) * sample1["items"] * world
        chunk_puts = sample1["chunks"] * world
        row.update(legacy_manifest_bytes=int(legacy), part_bytes_rank0=len(sample0["bytes"]),
                   part_bytes_rank1=len(sample1["bytes"]))
        rows.append(row)
        per_rank.append({"ranks": world, "tensor_bytes": sample1["tensor_bytes"], "items": sample1["items"],
                         "chunk_puts": sample1["chunks"], "metadata_puts": 1, "metadata_heads": 1,
                         "part_bytes": len(sample1["bytes"]), "encode_seconds": sample1["encode_s"],
                         "chunk_puts_per_prefix": chunk_puts / 256, "part_puts_per_prefix": world / 256,
                         "restore_gets_per_rank": 1 + 2 * sample1["chunks"]})
    return {"commit": rows, "per_rank": per_rank, "model": MODEL, "tensors": len(llama70b_shapes())}
