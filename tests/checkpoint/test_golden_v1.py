"""Old checkpoints stay readable: a format-version-1 checkpoint (tests/data/golden_v1, made once by
tests/data/make_golden_v1.py) restores with today's CheckpointManager to the exact values it held."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch

from cloudckpt import CheckpointManager, CorruptCheckpoint, FormatVersionError
from cloudckpt.format.manifest import (
    FORMAT_VERSION,
    READABLE_VERSIONS,
    canonical_sha256,
    parse_manifest,
)
from cloudckpt.storage.local import LocalStorage

DATA = Path(__file__).resolve().parents[1] / "data"
NAME = "checkpoint_step_00000007.ckpt"

WEIGHT = torch.tensor([[-0.75, -0.625, -0.5, -0.375],
                       [-0.25, -0.125, 0.0, 0.125],
                       [0.25, 0.375, 0.5, 0.625]], dtype=torch.float32)
BIAS = torch.tensor([-1.5, 0.0, 2.25], dtype=torch.float32)
COUNTS = torch.tensor([1, -2, 2**40], dtype=torch.int64)
HALF = torch.tensor([0.5, -0.25, 65504.0], dtype=torch.float16)
MASK = torch.tensor([True, False, True])


@pytest.fixture
def golden(tmp_path) -> Path:
    root = tmp_path / "golden_v1"
    shutil.copytree(DATA / "golden_v1", root)
    return root


def _v1_body() -> dict:
    return json.loads((DATA / "golden_v1" / NAME).read_bytes())


def test_golden_files_are_a_v1_checkpoint():
    body = _v1_body()
    assert (DATA / "golden_v1.ckpt").read_bytes() == (DATA / "golden_v1" / NAME).read_bytes()
    assert body["format_version"] == 1 and FORMAT_VERSION > 1
    assert "compression" not in body
    assert all(set(c) == {"key", "hash", "size", "crc"} for c in body["chunks"])
    # the checksum verifies as written, over the v1 body (computed here without cloudckpt)
    without = {k: v for k, v in body.items() if k != "manifest_sha256"}
    text = json.dumps(without, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    assert hashlib.sha256(text.encode("ascii")).hexdigest() == body["manifest_sha256"]
    assert canonical_sha256(body) == body["manifest_sha256"]


def test_v1_checkpoint_restores_in_place(golden):
    model = torch.nn.Linear(4, 3)
    weight_ptr = model.weight.data_ptr()
    state = {"model": model, "counts": torch.zeros(3, dtype=torch.int64), "half": torch.zeros(3, dtype=torch.float16),
             "mask": torch.zeros(3, dtype=torch.bool), "extra": {}}
    mgr = CheckpointManager(golden)
    info = mgr.restore(state)  # no latest.ckpt in v1's root: found by listing
    assert info.name == NAME and info.step == 7 and info.epoch == 0 and info.metrics == {"val_loss": 0.25}
    assert torch.equal(model.weight.detach(), WEIGHT) and torch.equal(model.bias.detach(), BIAS)
    assert model.weight.data_ptr() == weight_ptr
    assert torch.equal(state["counts"], COUNTS) and state["counts"][2].item() == 2**40
    assert torch.equal(state["half"], HALF) and torch.equal(state["mask"], MASK)
    assert state["extra"] == {"note": "golden v1", "lr": 0.001, "pair": (1, 2)}
    mgr.verify(NAME)


def test_v1_checkpoint_loads_by_name_and_by_step(golden):
    mgr = CheckpointManager(golden)
    loaded, info = mgr.load(NAME)
    assert info.step == 7
    assert torch.equal(loaded["model"]["weight"], WEIGHT) and torch.equal(loaded["model"]["bias"], BIAS)
    assert torch.equal(loaded["counts"], COUNTS) and torch.equal(loaded["half"], HALF)
    assert torch.equal(loaded["mask"], MASK)
    target = {"counts": torch.zeros(3, dtype=torch.int64)}
    assert mgr.restore(target, which=7, keys=["counts"]).name == NAME
    assert torch.equal(target["counts"], COUNTS)


def test_v1_manifest_migrates_to_the_current_version():
    data = (DATA / "golden_v1" / NAME).read_bytes()
    manifest = parse_manifest(data, f"golden/{NAME}")
    assert manifest.format_version == FORMAT_VERSION and manifest.compression == "none"
    body = _v1_body()
    for chunk, ref in zip(body["chunks"], manifest.chunks):
        assert (ref.key, ref.hash, ref.size, ref.crc32c, ref.raw_size) == (
            chunk["key"], chunk["hash"], chunk["size"], chunk["crc"], chunk["size"])


def test_tampered_v1_manifest_is_corrupt(golden):
    path = golden / NAME
    path.write_bytes(path.read_bytes().replace(b'"step": 7', b'"step": 8'))
    with pytest.raises(CorruptCheckpoint) as excinfo:
        CheckpointManager(golden).restore({"counts": torch.zeros(3, dtype=torch.int64)}, which=NAME)
    assert NAME in str(excinfo.value) and "checksum" in str(excinfo.value)


@pytest.mark.parametrize("version", [0, 999])
def test_format_version_error_lists_the_readable_versions(golden, version):
    body = _v1_body()
    body["format_version"] = version
    body["manifest_sha256"] = canonical_sha256(body)
    (golden / NAME).write_bytes(json.dumps(body).encode())
    store = LocalStorage(golden)
    with pytest.raises(FormatVersionError) as excinfo:
        CheckpointManager(store).restore({}, which=NAME)
    message = str(excinfo.value)
    assert NAME in message and str(version) in message
    assert ", ".join(map(str, READABLE_VERSIONS)) in message, message
    if version > FORMAT_VERSION:
        assert "Upgrade cloudckpt" in message
