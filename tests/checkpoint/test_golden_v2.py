"""A root written in format version 2 (tests/data/golden_v2, made once by tests/data/make_golden_v2.py
with the release before timelines) reads as one timeline, and a rollback in it keeps its bytes."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from cloudckpt import CheckpointManager
from cloudckpt.format.manifest import FORMAT_VERSION, MAIN_TIMELINE
from cloudckpt.storage.local import LocalStorage

DATA = Path(__file__).resolve().parents[1] / "data" / "golden_v2"
STEPS = (100, 200, 300)


def _name(step: int) -> str:
    return f"checkpoint_step_{step:08d}.ckpt"


@pytest.fixture
def root(tmp_path) -> Path:
    return Path(shutil.copytree(DATA, tmp_path / "golden_v2"))


def test_golden_files_are_a_version_2_root():
    for step in STEPS:
        body = json.loads((DATA / _name(step)).read_bytes())
        assert body["format_version"] == 2 < FORMAT_VERSION and "lineage" not in body
    assert not (DATA / ".cloudckpt" / "timeline.json").exists()


def test_a_version_2_root_reads_as_one_timeline(root):
    mgr = CheckpointManager(LocalStorage(root), monitor="val_loss", capture_rng=False)
    infos = mgr.list(superseded=True)
    assert [(i.step, i.timeline, i.parent, i.superseded) for i in infos] == [
        (s, MAIN_TIMELINE, None, False) for s in STEPS]
    assert mgr.latest().step == 300 and mgr.best().step == 200
    state = {"w": torch.zeros(4), "progress": {"step": 0}}
    assert mgr.restore(state).step == 300
    assert torch.equal(state["w"], torch.full((4,), 3.0)) and state["progress"] == {"step": 300}
    mgr.verify(_name(100))


def test_rolling_back_a_version_2_root_keeps_the_old_manifests_byte_for_byte(root):
    original = {s: (root / _name(s)).read_bytes() for s in STEPS}
    mgr = CheckpointManager(LocalStorage(root), monitor="val_loss", capture_rng=False)
    state = {"w": torch.zeros(4), "progress": {"step": 0}}
    mgr.restore(state, which=100)
    info = mgr.save({"w": torch.full((4,), 9.0), "progress": {"step": 200}}, step=200, metrics={"val_loss": 0.3})
    assert info.timeline != MAIN_TIMELINE and info.parent == _name(100)
    assert (root / _name(100)).read_bytes() == original[100]                    # history stays where it was
    for step in (200, 300):
        assert (root / "superseded" / MAIN_TIMELINE / _name(step)).read_bytes() == original[step]
    reader = CheckpointManager(LocalStorage(root), monitor="val_loss", capture_rng=False)
    assert reader.latest().name == _name(200) and reader.latest().timeline == info.timeline
    assert reader.best().step == 200 and reader.best().timeline == info.timeline  # 0.3 < the old 0.5
    old = {"w": torch.zeros(4), "progress": {"step": 0}}
    reader.restore(old, which=_name(300))                                       # abandoned work, by name
    assert torch.equal(old["w"], torch.full((4,), 3.0))
