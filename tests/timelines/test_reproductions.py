"""The three everyday paths of issue 11, on S3 (moto's server) and GCS (fake-gcs-server).

Each test fails on the release before timelines: (1) a save after restoring an older checkpoint
died with AlreadyExists and ``latest`` stayed on the abandoned run; (2) a damaged newest
manifest made the save of its step collide and blocked gc; (3) the library and the command line
gave two answers to "latest".  Plus the README quick start run twice.
"""

from __future__ import annotations

import json
import logging

import pytest
import torch
from timeline_util import blank, invoke, loss, manager, name, restored, same, save_run, state

from cloudckpt import CheckpointExists, CheckpointManager, KeepLastN
from cloudckpt.pointers import LATEST_POINTER, Pointer, read_pointer


# -- 1. roll back and go on ---------------------------------------------------------------------
def test_restore_an_older_checkpoint_then_save_starts_a_new_timeline(cloud_root, caplog):
    store = cloud_root.store
    save_run(manager(store), (100, 200, 300))

    mgr = manager(store)
    target = blank()
    assert mgr.restore(target, which=name(100)).step == 100 and same(target, state(100))
    with caplog.at_level(logging.WARNING, logger="cloudckpt"):
        info = mgr.save(state(200, "b"), step=200, metrics={"loss": loss(200, "b")})  # was AlreadyExists
    branch_logs = [r.getMessage() for r in caplog.records if "branching" in r.getMessage()]
    assert len(branch_logs) == 1 and name(100) in branch_logs[0] and name(300) in branch_logs[0]
    assert info.timeline != "main" and info.parent == name(100)
    assert mgr.latest().name == name(200)                                     # was step 300
    got, target = restored(store)
    assert got == name(200) and same(target, state(200, "b"))                 # a restart resumes the new run

    listed = {(i.name, i.superseded) for i in manager(store).list(superseded=True)}
    assert listed == {(name(100), False), (name(200), False), (name(200), True), (name(300), True)}
    # the abandoned work is kept and reachable by name, never by accident
    _, old = restored(store, which=name(300))
    assert same(old, state(300))
    assert read_pointer(store, LATEST_POINTER).target == name(200)


def test_rollback_command_then_continue(cloud_root):
    store = cloud_root.store
    save_run(manager(store), (100, 200, 300))
    dry = invoke("rollback", f"{cloud_root.url}@{name(100)}", "--dry-run", "--json", *cloud_root.cli_options)
    assert dry.returncode == 0, str(dry)
    assert [s["name"] for s in dry.json()["superseded"]] == [name(200), name(300)]
    assert restored(store)[0] == name(300)                                    # a dry run changes nothing

    done = invoke("rollback", cloud_root.url, "100", *cloud_root.cli_options)
    assert done.returncode == 0, str(done)
    assert f"rolled back to {name(100)}" in done.stdout
    got, target = restored(store)
    assert got == name(100) and same(target, state(100))
    mgr = manager(store)
    mgr.restore(blank())
    save_run(mgr, (200, 300), "b")
    assert restored(store)[0] == name(300) and same(restored(store)[1], state(300, "b"))
    tree = invoke("ls", cloud_root.url, "--tree", *cloud_root.cli_options)
    assert tree.returncode == 0 and "superseded" in tree.stdout and "(live)" in tree.stdout, str(tree)


# -- 2. a damaged newest checkpoint ------------------------------------------------------------
def test_damaged_newest_is_quarantined_and_its_step_saved_again(cloud_root, caplog):
    store = cloud_root.store
    save_run(manager(store), (100, 200))
    store.put(name(200), store.get(name(200)).replace(b'"step": 200', b'"step": 201', 1))  # one field edited
    store.put("notes.ckpt", b"remember to rerun with lr=3e-4\n")                           # and a stray object

    mgr = manager(store)
    target = blank()
    with caplog.at_level(logging.WARNING, logger="cloudckpt"):
        assert mgr.restore(target).name == name(100) and same(target, state(100))
    messages = " ".join(r.getMessage() for r in caplog.records)
    assert f"quarantined {store.url}/{name(200)}" in messages and "checksum" in messages
    assert f"cloudckpt quarantine {store.url} notes.ckpt" in messages
    assert mgr.save(state(200, "b"), step=200, metrics={"loss": 0.1}).name == name(200)  # was AlreadyExists
    assert restored(store)[0] == name(200) and same(restored(store)[1], state(200, "b"))

    listing = invoke("ls", cloud_root.url, "--json", *cloud_root.cli_options).json()
    assert [q["name"] for q in listing["quarantined"]] == [name(200)]
    assert "checksum" in listing["quarantined"][0]["reason"]
    assert [u["name"] for u in listing["unreadable"]] == ["notes.ckpt"]
    moved = invoke("quarantine", cloud_root.url, "notes.ckpt", *cloud_root.cli_options)
    assert moved.returncode == 0, str(moved)
    gc = invoke("gc", cloud_root.url, "--yes", "--grace", "0", *cloud_root.cli_options)
    assert gc.returncode == 0 and "unreferenced chunk" in gc.stdout, str(gc)  # gc no longer refuses


def test_ls_on_a_damaged_newest_still_shows_latest_and_a_readable_status(cloud_root):
    store = cloud_root.store
    save_run(manager(store), (100, 200))
    store.put(name(200), store.get(name(200))[:50])
    ls = invoke("ls", cloud_root.url, *cloud_root.cli_options)
    assert ls.returncode == 0, str(ls)
    rows = {line.split()[0]: line for line in ls.stdout.splitlines()[1:]}
    assert "latest" in rows[name(100)]
    assert "DAMAGED" in rows[name(200)] and "--repair" in rows[name(200)]
    assert "CorruptCheckpoint" not in ls.stdout
    repaired = invoke("verify", f"{cloud_root.url}@{name(200)}", "--repair", *cloud_root.cli_options)
    assert repaired.returncode == 0 and "quarantined ->" in repaired.stdout, str(repaired)
    assert [c["name"] for c in invoke("ls", cloud_root.url, "--json", *cloud_root.cli_options).json()["quarantined"]] \
        == [name(200)]


# -- 3. one answer to "latest" -------------------------------------------------------------------
def test_library_and_command_line_agree_on_latest(cloud_root, tmp_path):
    store = cloud_root.store
    save_run(manager(store), (1, 2))
    mgr = manager(store)
    mgr.save(state(3), step=3, metrics={"loss": 0.9})
    store.put(LATEST_POINTER, Pointer(name(2), 2).to_bytes())  # the writer died between commit and pointer move
    assert restored(store)[0] == name(3)
    for command in (["show", cloud_root.url, "--json"], ["show", f"{cloud_root.url}@latest", "--json"]):
        shown = invoke(*command, *cloud_root.cli_options)
        assert shown.returncode == 0 and shown.json()["name"] == name(3), str(shown)
    verify = invoke("verify", cloud_root.url, *cloud_root.cli_options)
    assert verify.stdout.startswith(f"OK      {name(3)}"), str(verify)
    out = tmp_path / "local"
    copied = invoke("restore", cloud_root.url, str(out), "--json", *cloud_root.cli_options)
    assert copied.returncode == 0 and copied.json()["name"] == name(3), str(copied)
    assert CheckpointManager(out, capture_rng=False).latest().name == name(3)
    ls = invoke("ls", cloud_root.url, "--json", *cloud_root.cli_options).json()
    assert [c["name"] for c in ls["checkpoints"] if "latest.ckpt" in c["pointers"]] == [name(3)]


def test_one_grammar_for_choosing_a_checkpoint(cloud_root, tmp_path, monkeypatch):
    store = cloud_root.store
    save_run(manager(store), (1, 2, 3))            # losses 1, 1/2, 1/3: best is step 3
    manager(store).rollback(to=2)                  # now best and latest are step 2
    monkeypatch.chdir(tmp_path)
    ambiguous = invoke("restore", cloud_root.url, "best", *cloud_root.cli_options)
    assert ambiguous.returncode == 2 and "@best" in ambiguous.stderr, str(ambiguous)
    assert not (tmp_path / "best").exists()
    for which, expected in (("best", 2), ("latest", 2), ("1", 1), (name(3), 3)):
        shown = invoke("show", f"{cloud_root.url}@{which}", "--json", *cloud_root.cli_options)
        assert shown.returncode == 0 and shown.json()["step"] == expected, (which, str(shown))
    copied = invoke("restore", f"{cloud_root.url}@1", str(tmp_path / "one"), "--json", *cloud_root.cli_options)
    assert copied.returncode == 0 and copied.json()["name"] == name(1), str(copied)


# -- the README quick start, run twice ----------------------------------------------------------
def test_saving_a_step_again(cloud_root):
    store = cloud_root.store
    for _ in range(2):                             # the quick start hard-codes step=100
        torch.manual_seed(0)
        model = torch.nn.Linear(16, 1)
        optimizer = torch.optim.AdamW(model.parameters())
        mgr = CheckpointManager(store, monitor="val_loss", retention=KeepLastN(3))
        state_ = {"model": model, "optimizer": optimizer}
        mgr.restore(state_)
        info = mgr.save(state_, step=100, epoch=1, metrics={"val_loss": 0.5})
        assert info.name == name(100)
        mgr.close()
    assert [i.name for i in CheckpointManager(store).list()] == [name(100)]
    mgr = manager(store)
    with pytest.raises(CheckpointExists, match="already committed on the live timeline") as excinfo:
        mgr.save(state(100), step=100)             # another state at a saved step: one clear error
    assert "rollback" in str(excinfo.value)
    assert json.loads(store.get(name(100)))["step"] == 100
