"""In-process checks of the command's pieces: name splitting, durations, promote, export, copy_checkpoint."""

from __future__ import annotations

import datetime as dt
import json
import sys

import pytest
import torch
from cli_helpers import NAMES, invoke, make_run

import cloudckpt
from cloudckpt.cli import parse_duration, split_target, tensor_paths
from cloudckpt.copy import copy_checkpoint
from cloudckpt.errors import AlreadyExists, CorruptCheckpoint
from cloudckpt.pointers import LATEST_POINTER, read_pointer
from cloudckpt.reader import load_manifest


@pytest.mark.parametrize(("target", "expected"), [
    ("s3://b/runs/exp", ("s3://b/runs/exp", None)),
    ("s3://b/runs/exp/", ("s3://b/runs/exp/", None)),
    ("s3://b/runs/exp/checkpoint_step_00000010.ckpt", ("s3://b/runs/exp", "checkpoint_step_00000010.ckpt")),
    ("gs://b/latest.ckpt", ("gs://b", "latest.ckpt")),
    ("s3://bucket.ckpt", ("s3://bucket.ckpt", None)),
    ("/data/run/best_model_loss.ckpt", ("/data/run", "best_model_loss.ckpt")),
    ("file:///data/run/x.ckpt", ("file:///data/run", "x.ckpt")),
    ("file:///x.ckpt", ("file:///", "x.ckpt")),
    ("x.ckpt", (".", "x.ckpt")),
    ("run", ("run", None)),
    ("s3://b/runs/exp@best", ("s3://b/runs/exp", "best")),
    ("gs://b/runs/exp@checkpoint_step_00000010.ckpt", ("gs://b/runs/exp", "checkpoint_step_00000010.ckpt")),
    ("/data/run@300", ("/data/run", "300")),
    ("/data/run@timeline:t-5f0c2a9b1e7d", ("/data/run", "timeline:t-5f0c2a9b1e7d")),
])
def test_split_target(target, expected):
    assert split_target(target) == expected


def test_parse_duration():
    assert parse_duration("30m") == dt.timedelta(minutes=30)
    assert parse_duration("6h") == dt.timedelta(hours=6)
    assert parse_duration("2d") == dt.timedelta(days=2)
    assert parse_duration("1h30m") == dt.timedelta(minutes=90)
    assert parse_duration("0") == parse_duration("0s") == dt.timedelta(0)
    for bad in ("", "6", "h", "6x", "-1h", "six hours"):
        with pytest.raises(ValueError, match="not a duration"):
            parse_duration(bad)


def test_tensor_paths_walk_every_tagged_form():
    tree = {
        "model": {"__state_dict__": {"w": {"__tensor__": 0}}, "__metadata__": {"": {"version": 1}}},
        "opt": {"__state_dict__": {"state": {"__dict__": [[0, {"buf": {"__tensor__": 1}}]]},
                                   "groups": [{"betas": {"__tuple__": [0.9, 0.99]}, "lr": {"__float__": "nan"}}]}},
        "pair": {"__tuple__": [{"__ndarray__": 2}, 3]},
        "raw": {"__bytes__": "AA=="},
    }
    assert tensor_paths(tree) == [("model/w", 0), ("opt/state/0/buf", 1), ("pair/0", 2)]
    assert tensor_paths(tree["model"], sep=".") == [("w", 0)]


def test_running_the_command_again_in_one_process_adds_no_second_redaction_filter(tmp_path):
    """Each run used to add one more RedactSecrets to every root handler: in a long-lived process
    (a notebook, a test session) every log record then went through hundreds of redactions."""
    import logging

    from cloudckpt.cli.redact import RedactSecrets

    handler = logging.StreamHandler()
    logging.getLogger().addHandler(handler)
    try:
        for _ in range(3):
            assert invoke("ls", str(tmp_path)).returncode == 0
        assert sum(isinstance(f, RedactSecrets) for f in handler.filters) == 1
    finally:
        logging.getLogger().removeHandler(handler)


@pytest.fixture(scope="module", params=["none", "zstd"])
def local_run(tmp_path_factory, request):
    """A local run, plain and zstd-compressed: export and copy must handle both."""
    return make_run(str(tmp_path_factory.mktemp("cli") / "run"), pin=None, compression=request.param)


def _pointers(root: str) -> dict[str, str]:
    listing = json.loads(invoke("ls", root, "--json").stdout)
    return {k: p["target"] for k, p in listing["pointers"].items()}


def test_promote_forces_pointers_and_pins(tmp_path):
    root = make_run(str(tmp_path / "run"), pin=None).root
    assert _pointers(root)["best_model_val_loss.ckpt"] == NAMES[20]

    promoted = invoke("promote", f"{root}/{NAMES[30]}", "--metric", "val_loss", "--pin")
    assert promoted.returncode == 0, str(promoted)
    assert f"best_model_val_loss: {NAMES[20]} -> {NAMES[30]}" in promoted.stdout  # worse, but forced
    assert f"pinned {NAMES[30]}" in promoted.stdout
    with cloudckpt.open_storage(root) as store:
        pointer = read_pointer(store, "best_model_val_loss.ckpt")
    assert (pointer.target, pointer.value, pointer.mode) == (NAMES[30], 0.7, "min")

    assert "unpinned" in invoke("promote", root, NAMES[30], "--unpin").stdout
    # --latest is the rollback: a new timeline at step 10, the later checkpoints superseded (kept)
    rollback = invoke("promote", root, "10", "--latest", "--json")
    assert rollback.returncode == 0, str(rollback)
    change, = json.loads(rollback.stdout)["changes"]
    assert (change["pointer"], change["before"], change["superseded"]) == (LATEST_POINTER, NAMES[30],
                                                                           [NAMES[20], NAMES[30]])
    listing = json.loads(invoke("ls", root, "--json").stdout)
    flags = {c["name"]: c["pointers"] for c in listing["checkpoints"]}
    assert flags == {NAMES[10]: ["latest.ckpt", "best_model_val_loss.ckpt"]}
    assert sorted(c["name"] for c in listing["superseded"]) == [NAMES[20], NAMES[30]]

    nothing = invoke("promote", f"{root}/{NAMES[30]}")
    assert nothing.returncode == 2 and "nothing to do" in nothing.stderr
    no_metric = invoke("promote", f"{root}/{NAMES[30]}", "--metric", "accuracy")
    assert no_metric.returncode == 1 and "has no metric 'accuracy' (it has: val_loss)" in no_metric.stderr


def test_export_safetensors_of_the_best(local_run, tmp_path):
    safetensors_torch = pytest.importorskip("safetensors.torch")
    out = tmp_path / "model.safetensors"
    result = invoke("restore", f"{local_run.root}/best_model_val_loss.ckpt", "--export", str(out))
    assert result.returncode == 0, str(result)
    weights = safetensors_torch.load_file(str(out))
    assert set(weights) == set(local_run.models[20])
    for key, value in local_run.models[20].items():
        assert torch.equal(weights[key], value), key


def test_export_errors(local_run, tmp_path, monkeypatch):
    missing_key = invoke("restore", local_run.root, "--export", str(tmp_path / "m.pt"), "--key", "net")
    assert missing_key.returncode == 1 and "no state entry 'net' (entries: extra, model, optimizer)" in missing_key.stderr
    bad_suffix = invoke("restore", local_run.root, "--export", str(tmp_path / "m.bin"))
    assert bad_suffix.returncode == 2 and ".safetensors or .pt" in bad_suffix.stderr
    to_bucket = invoke("restore", local_run.root, "s3://bucket/x")
    assert to_bucket.returncode == 2 and "cloudckpt cp" in to_bucket.stderr
    monkeypatch.setitem(sys.modules, "safetensors", None)
    monkeypatch.setitem(sys.modules, "safetensors.torch", None)
    no_package = invoke("restore", local_run.root, "--export", str(tmp_path / "m.safetensors"))
    assert no_package.returncode == 1 and "pip install safetensors" in no_package.stderr
    assert not (tmp_path / "m.safetensors").exists() and not (tmp_path / "m.pt").exists()


# -- copy_checkpoint ------------------------------------------------------------------------
def test_copy_checkpoint_dedups_reports_progress_and_never_moves_latest_back(local_run, tmp_path):
    events = []
    with cloudckpt.open_storage(local_run.root) as src, cloudckpt.open_storage(str(tmp_path / "dst")) as dst:
        newest = copy_checkpoint(src, dst, NAMES[30], progress=lambda n, total: events.append((n, total)))
        assert newest.chunks_copied >= 2 and newest.chunks_skipped == 0
        assert events[0] == (0, newest.bytes_copied) and sum(n for n, _ in events) == newest.bytes_copied
        assert newest.pointers_moved == ["latest.ckpt", "best_model_val_loss.ckpt"]

        older = copy_checkpoint(src, dst, NAMES[20])
        assert older.chunks_skipped >= 1  # the frozen embedding
        assert older.pointers_moved == ["best_model_val_loss.ckpt"]  # 0.5 beats 0.7; latest stays at 30
        assert read_pointer(dst, LATEST_POINTER).target == NAMES[30]

        again = copy_checkpoint(src, dst, NAMES[20])
        assert again.already_present and again.chunks_copied == 0 and again.pointers_moved == []
        index = json.loads(dst.get(".cloudckpt/state.json"))["checkpoints"]
        assert set(index) == {NAMES[20], NAMES[30]} and index[NAMES[20]]["metrics"] == {"val_loss": 0.5}


def test_copy_checkpoint_refuses_a_bad_chunk_and_a_different_manifest(local_run, tmp_path):
    src_dir = tmp_path / "src"
    src_run = make_run(str(src_dir), pin=None)
    with cloudckpt.open_storage(src_run.root) as src, cloudckpt.open_storage(str(tmp_path / "dst")) as dst:
        ref = load_manifest(src, NAMES[10]).chunks[0]
        path = src_dir / ref.key
        data = bytearray(path.read_bytes())
        data[0] ^= 0xFF
        path.write_bytes(bytes(data))
        with pytest.raises(CorruptCheckpoint, match=ref.key):
            copy_checkpoint(src, dst, NAMES[10])
        assert NAMES[10] not in [i.key for i in dst.list("")]  # nothing committed

        with cloudckpt.open_storage(local_run.root) as other:
            copy_checkpoint(other, dst, NAMES[20])  # same name, different run
        with pytest.raises(AlreadyExists, match="different checkpoint"):
            copy_checkpoint(src, dst, NAMES[20])
