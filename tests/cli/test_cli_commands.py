"""The ``cloudckpt`` command run as a subprocess against local, S3 (moto) and GCS (fake-gcs-server) roots."""

from __future__ import annotations

import pytest
import torch
from cli_helpers import NAMES, assert_one_line_error, invoke, make_run, run, run_many
from gcs_helpers import drain_server_log

import cloudckpt
from cloudckpt.format.manifest import FORMAT_VERSION
from cloudckpt.reader import load_manifest


#: Every command that moves or checks chunk bytes (verify, cp, restore, export) runs on plain and on
#: zstd-compressed checkpoints; ls and show read manifests only, which compression leaves alone.
COMPRESSIONS = pytest.mark.parametrize("compression", ["none", "zstd"])


@pytest.fixture
def gcs(fake_gcs):
    drain_server_log(fake_gcs)
    return fake_gcs


def _row(stdout: str, name: str) -> str:
    return next(line for line in stdout.splitlines() if line.startswith(name))


def _keys(root: str, **options) -> list[str]:
    with cloudckpt.open_storage(root, **options) as store:
        return [i.key for i in store.list("")]


# -- ls / show / verify -------------------------------------------------------------------
@COMPRESSIONS
def test_ls_show_verify_on_a_local_root(tmp_path, compression):
    root = str(tmp_path / "run")
    make_run(root, compression=compression)
    ls = run("ls", root)  # the real entry point; the rest in-process, to keep the suite fast
    ls_json = invoke("ls", f"file://{root}", "--json")
    show = invoke("show", f"{root}/{NAMES[20]}")
    show_json = invoke("show", root, "latest", "--json")
    verify = invoke("verify", root)
    verify_all = invoke("verify", root, "--all", "--json")
    for result in (ls, ls_json, show, show_json, verify, verify_all):
        assert result.returncode == 0, str(result)

    assert ls.stdout.splitlines()[0].split() == ["NAME", "STEP", "EPOCH", "METRICS", "SIZE", "AGE", "POINTERS"]
    assert "latest" in _row(ls.stdout, NAMES[30])
    assert "best_model_val_loss" in _row(ls.stdout, NAMES[20])
    assert "pinned" in _row(ls.stdout, NAMES[10]) and "val_loss=0.9" in _row(ls.stdout, NAMES[10])
    listing = ls_json.json()
    assert [c["name"] for c in listing["checkpoints"]] == [NAMES[10], NAMES[20], NAMES[30]]
    by_name = {c["name"]: c for c in listing["checkpoints"]}
    assert by_name[NAMES[30]]["pointers"] == ["latest.ckpt"]
    assert by_name[NAMES[20]]["pointers"] == ["best_model_val_loss.ckpt"]
    assert by_name[NAMES[10]]["pinned"] and not by_name[NAMES[20]]["pinned"]
    assert by_name[NAMES[20]]["metrics"] == {"val_loss": 0.5} and by_name[NAMES[20]]["epoch"] == 2

    assert "step          20" in show.stdout and f"cloudckpt v{FORMAT_VERSION}" in show.stdout
    assert "best_model_val_loss" in show.stdout
    tensor_row = _row(show.stdout, "model/2.weight")
    assert tensor_row.split()[:3] == ["model/2.weight", "float32", "(8,"]
    assert "optimizer/state/0/momentum_buffer" in show.stdout
    summary = show_json.json()
    assert summary["name"] == NAMES[30] and summary["step"] == 30 and summary["format_version"] == FORMAT_VERSION
    assert summary["compression"] == compression and summary["chunks"] >= 2 and summary["library_version"]
    tensors = {t["path"]: t for t in summary["tensors"]}
    assert tensors["model/0.weight"]["shape"] == [64, 16] and tensors["model/0.weight"]["dtype"] == "float32"
    assert tensors["model/2.bias"]["shape"] == [8]

    assert verify.stdout.startswith(f"OK      {NAMES[30]}")
    report = verify_all.json()
    assert report["ok"] and [c["name"] for c in report["checkpoints"]] == sorted(NAMES.values())
    assert all(c["ok"] and c["chunks"] >= 2 and not c["errors"] for c in report["checkpoints"])


def test_ls_show_verify_on_s3_and_gcs_roots(moto_s3, gcs):
    """Plain chunks only: verify of zstd chunks runs on the local root above, and read from S3 and
    GCS by the zstd ``cp`` below."""
    s3_root = f"s3://{moto_s3.new_bucket()}/runs/exp1"
    gs_root = f"gs://{gcs.new_bucket()}/runs/exp1"
    make_run(s3_root, storage_options={"endpoint_url": moto_s3.endpoint_url})
    make_run(gs_root, storage_options={"endpoint_url": gcs.endpoint_url}, pin=None)
    s3 = ["--endpoint-url", moto_s3.endpoint_url]
    gs = ["--endpoint-url", gcs.endpoint_url]
    s3_ls, gs_show = run_many(("ls", s3_root, "--json", *s3), ("show", gs_root, "best", "--json", *gs))
    s3_show = invoke("show", f"{s3_root}/{NAMES[10]}", *s3)
    s3_verify = invoke("verify", s3_root, "--all", *s3)
    gs_ls = invoke("ls", gs_root, *gs)
    gs_verify = invoke("verify", f"{gs_root}/{NAMES[20]}", "--json", *gs)
    for result in (s3_ls, s3_show, s3_verify, gs_ls, gs_show, gs_verify):
        assert result.returncode == 0, str(result)

    checkpoints = {c["name"]: c for c in s3_ls.json()["checkpoints"]}
    assert s3_ls.json()["root"] == s3_root
    assert checkpoints[NAMES[30]]["pointers"] == ["latest.ckpt"] and checkpoints[NAMES[10]]["pinned"]
    assert f"{s3_root}/{NAMES[10]}" in s3_show.stdout and "model/0.weight" in s3_show.stdout
    assert s3_verify.stdout.count("OK  ") == 3 and s3_verify.stdout.strip().endswith("3 OK, 0 FAILED")

    assert "best_model_val_loss" in _row(gs_ls.stdout, NAMES[20]) and "latest" in _row(gs_ls.stdout, NAMES[30])
    assert gs_show.json()["name"] == NAMES[20] and gs_show.json()["pointers"] == ["best_model_val_loss.ckpt"]
    assert gs_verify.json()["ok"] and gs_verify.json()["checkpoints"][0]["name"] == NAMES[20]


# -- cp ------------------------------------------------------------------------------------
@COMPRESSIONS
def test_cp_s3_to_gcs_to_local_then_verify_and_restore(moto_s3, gcs, tmp_path, compression):
    s3_root = f"s3://{moto_s3.new_bucket()}/runs/exp1"
    gs_root = f"gs://{gcs.new_bucket()}/mirror"
    local = str(tmp_path / "local")
    original = make_run(s3_root, storage_options={"endpoint_url": moto_s3.endpoint_url}, compression=compression)

    to_gcs = run("cp", s3_root, gs_root, "--src-endpoint-url", moto_s3.endpoint_url,
                 "--dst-endpoint-url", gcs.endpoint_url, "--json")
    assert to_gcs.returncode == 0, str(to_gcs)
    copied = to_gcs.json()["checkpoints"]
    assert [c["name"] for c in copied] == [NAMES[10], NAMES[20], NAMES[30]]  # oldest first
    assert copied[0]["chunks_copied"] >= 2 and copied[0]["chunks_skipped"] == 0
    assert copied[1]["chunks_skipped"] >= 1  # the frozen embedding's chunk is already there
    assert "best_model_val_loss.ckpt" in copied[1]["pointers_moved"]
    assert "best_model_val_loss.ckpt" not in copied[2]["pointers_moved"]  # forward-only: 0.7 loses to 0.5

    to_local = invoke("cp", gs_root, local, "--endpoint-url", gcs.endpoint_url)
    again = invoke("cp", f"{s3_root}/{NAMES[30]}", gs_root, "--src-endpoint-url", moto_s3.endpoint_url,
                   "--dst-endpoint-url", gcs.endpoint_url, "--json")
    assert to_local.returncode == 0, str(to_local)
    assert to_local.stdout.count("chunks copied") == 3
    assert again.returncode == 0 and again.json()["checkpoints"][0]["already_present"], str(again)

    verify, ls = invoke("verify", local, "--all"), invoke("ls", local, "--json")
    assert verify.returncode == 0 and verify.stdout.strip().endswith("3 OK, 0 FAILED"), str(verify)
    pointers = ls.json()["pointers"]
    assert pointers["latest.ckpt"]["target"] == NAMES[30]
    assert pointers["best_model_val_loss.ckpt"]["target"] == NAMES[20]

    with cloudckpt.CheckpointManager(local, monitor="val_loss") as mgr:
        assert [i.name for i in mgr.list()] == [NAMES[10], NAMES[20], NAMES[30]]
        for step in (20, 30):
            model = torch.nn.Sequential(torch.nn.Embedding(64, 16), torch.nn.Flatten(), torch.nn.Linear(64, 8))
            info = mgr.restore({"model": model}, which=NAMES[step], keys=["model"])
            assert info.step == step
            for key, value in model.state_dict().items():
                assert torch.equal(value, original.models[step][key]), (step, key)
        assert mgr.best().name == NAMES[20]
        state = mgr.load(NAMES[10])[0]
        assert state["extra"] == {"note": "cli test"}


# -- corruption ------------------------------------------------------------------------------
@COMPRESSIONS
def test_verify_fails_on_a_flipped_byte_and_names_the_chunk(tmp_path, compression):
    root = tmp_path / "run"
    make_run(str(root), pin=None, compression=compression)
    with cloudckpt.open_storage(str(root)) as store:
        manifest_chunks = {c.key for c in load_manifest(store, NAMES[30]).chunks}
        others = {c.key for n in (NAMES[10], NAMES[20]) for c in load_manifest(store, n).chunks}
    victim = min(manifest_chunks - others)
    path = root / victim
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))

    latest = run("verify", str(root))
    everything = invoke("verify", str(root), "--all", "--json")
    assert latest.returncode == 1, str(latest)
    assert latest.stdout.startswith(f"FAILED  {NAMES[30]}") and victim in latest.stdout
    assert "CRC32C mismatch" in latest.stdout
    assert everything.returncode == 1
    report = {c["name"]: c for c in everything.json()["checkpoints"]}
    assert not everything.json()["ok"]
    assert report[NAMES[10]]["ok"] and report[NAMES[20]]["ok"] and not report[NAMES[30]]["ok"]
    assert len(report[NAMES[30]]["errors"]) == 1 and victim in report[NAMES[30]]["errors"][0]


# -- gc --------------------------------------------------------------------------------------
def test_gc_dry_run_changes_nothing_and_yes_keeps_pointer_targets(moto_s3):
    root = f"s3://{moto_s3.new_bucket()}/runs/gc"
    opts = {"endpoint_url": moto_s3.endpoint_url}
    make_run(root, storage_options=opts, pin=None)
    ep = ["--endpoint-url", moto_s3.endpoint_url]
    before = _keys(root, **opts)

    dry = invoke("gc", root, "--keep-last", "1", "--grace", "0s", *ep)
    assert dry.returncode == 0, str(dry)
    assert _keys(root, **opts) == before
    assert f"would remove 1 checkpoint(s):\n  {NAMES[10]}" in dry.stdout
    assert "would delete" in dry.stdout and "--yes" in dry.stderr

    done, = run_many(("gc", root, "--keep-last", "1", "--grace", "0s", "--yes", "--json", *ep))
    assert done.returncode == 0, str(done)
    report = done.json()
    assert not report["dry_run"] and [c["name"] for c in report["checkpoints_removed"]] == [NAMES[10]]
    assert report["chunks_removed"] >= 1
    kept = {c["name"]: c["pointers"] for c in report["checkpoints_kept"]}
    assert kept == {NAMES[20]: ["best_model_val_loss.ckpt"], NAMES[30]: ["latest.ckpt"]}

    after = _keys(root, **opts)
    assert NAMES[10] not in after and NAMES[20] in after and NAMES[30] in after
    assert len([k for k in after if k.startswith("chunks/")]) < len([k for k in before if k.startswith("chunks/")])
    verify = invoke("verify", root, "--all", *ep)
    assert verify.returncode == 0 and verify.stdout.strip().endswith("2 OK, 0 FAILED"), str(verify)


# -- errors ----------------------------------------------------------------------------------
def test_user_mistakes_give_one_line_on_stderr(tmp_path, moto_s3):
    root = str(tmp_path / "run")
    make_run(root, pin=None)
    bad_url, missing_ckpt = run_many(("ls", "ftp://host/path"), ("show", f"{root}/checkpoint_step_00000099.ckpt"))
    missing_dir = invoke("ls", str(tmp_path / "nowhere"))
    bad_name = invoke("verify", root, "not a name")
    no_bucket = invoke("ls", "s3://no-such-bucket-cloudckpt/x", "--endpoint-url", moto_s3.endpoint_url)
    empty = invoke("verify", str(tmp_path))
    bad_duration = invoke("gc", root, "--grace", "soon")
    assert_one_line_error(bad_url, code=2)
    assert "unsupported storage URL" in bad_url.stderr
    assert_one_line_error(missing_dir, code=1)
    assert "no such directory" in missing_dir.stderr
    assert_one_line_error(missing_ckpt, code=1)
    assert "checkpoint_step_00000099.ckpt: no such checkpoint" in missing_ckpt.stderr
    assert_one_line_error(bad_name, code=2)
    assert_one_line_error(no_bucket, code=1)
    assert "no-such-bucket-cloudckpt" in no_bucket.stderr
    assert_one_line_error(empty, code=1)
    assert "no checkpoint" in empty.stderr
    assert bad_duration.returncode == 2 and "not a duration" in bad_duration.stderr
    assert "Traceback" not in bad_duration.stderr


# -- restore ---------------------------------------------------------------------------------
@COMPRESSIONS
def test_restore_copies_a_checkpoint_and_exports_weights(tmp_path, compression):
    root = str(tmp_path / "run")
    original = make_run(root, pin=None, compression=compression)
    dest = tmp_path / "restored"
    pt = tmp_path / "serve" / "model.pt"
    export = run("restore", root, "--export", str(pt))
    copy = invoke("restore", root, str(dest))
    assert copy.returncode == 0, str(copy)
    assert export.returncode == 0, str(export)
    assert f"of 'model' from {NAMES[30]}" in export.stdout

    weights = torch.load(pt, weights_only=True)
    assert set(weights) == set(original.models[30])
    for key, value in original.models[30].items():
        assert torch.equal(weights[key], value), key
    model = torch.nn.Sequential(torch.nn.Embedding(64, 16), torch.nn.Flatten(), torch.nn.Linear(64, 8))
    model.load_state_dict(weights)

    with cloudckpt.CheckpointManager(str(dest), monitor="val_loss") as mgr:
        assert [i.name for i in mgr.list()] == [NAMES[30]]
        assert mgr.latest().name == NAMES[30]
        restored = torch.nn.Sequential(torch.nn.Embedding(64, 16), torch.nn.Flatten(), torch.nn.Linear(64, 8))
        mgr.restore({"model": restored}, keys=["model"])
        for key, value in restored.state_dict().items():
            assert torch.equal(value, original.models[30][key])
