"""Elastic resume: an FSDP2 run saved by 4 ranks restores at 4 (bit for bit), 3, 2 and in one process.

Each launch is a gloo process group of real subprocesses (elastic_worker.py) on
S3 (moto) or GCS (fake-gcs-server); one module-scoped sequence per backend:

1. 4 ranks: train, save step 2; a save where rank 2 can reach nothing (fails on
   every rank, naming rank 2); train, save step 4.
2. 4 ranks: restore step 2, train 2 steps: the same weights and Adam moments as
   the first run's step 4 (RNG restored per rank); then a save in which rank 3
   is SIGKILLed mid-upload: the others fail, nothing is committed.
3. 3 ranks: restore latest: step 4 (the newest complete checkpoint), resharded;
   train one step, save step 5.
4. 2 ranks: restore step 4 (4 -> 2) and latest (step 5, 3 -> 2).

GCS runs steps 1 and 3 only.  ``fingerprint`` (elastic_worker.py) hashes the
full parameters and moments, so equal fingerprints across world sizes mean the
same state.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from dist_helpers import run_ranks

from cloudckpt import CheckpointManager
from cloudckpt.distributed import RANKS_KEY
from cloudckpt.storage import open_storage

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]  # 4 launches of 2-4 torch processes each
WORKER = Path(__file__).with_name("elastic_worker.py")


def _launch(scenario: str, args: dict, world: int, **kwargs) -> list:
    results = run_ranks(scenario, args, world_size=world, worker=WORKER, **kwargs)
    for rank, result in enumerate(results):
        assert result is None or "unexpected" not in result, (rank, result)
    return results


@pytest.fixture(scope="module", params=["s3", "gcs"])
def elastic(request):
    if request.param == "s3":
        server = request.getfixturevalue("moto_s3")
        url = f"s3://{server.new_bucket()}/run"
    else:
        server = request.getfixturevalue("fake_gcs")
        url = f"gs://{server.new_bucket()}/run"
    base = {"url": url, "options": {"endpoint_url": server.endpoint_url}, "pg_timeout": 30}
    runs = {"save": _launch("save", {**base, "fail_rank": 2}, 4)}
    if request.param == "s3":
        runs["resume"] = _launch("restore", {**base, "which": 2, "train": 2, "save_step": 6, "kill_rank": 3}, 4,
                                 may_die=(3,))
    runs["at_3"] = _launch("restore", {**base, "train": 1, "save_step": 5}, 3)
    if request.param == "s3":
        runs["at_2"] = _launch("restore", {**base, "which": 4}, 2)
        runs["at_2_latest"] = _launch("restore", base, 2)
    return request.param, base, runs


def test_saves_commit_once_and_a_failing_rank_is_named_everywhere(elastic):
    _, _, runs = elastic
    for result in runs["save"]:
        assert result["saved"] == 2 and result["saved_4"] == 4
        assert result["failed_save"]["ranks"] == [2], result  # every rank names rank 2
        assert "PermissionDenied" in result["failed_save"]["message"]
        assert result["latest_after_failure"] == 2  # nothing committed for step 3
    assert len({r["at_4"] for r in runs["save"]}) == 1


def test_same_world_size_continues_bit_for_bit(elastic):
    kind, _, runs = elastic
    if kind != "s3":
        pytest.skip("run on S3 only (launch cost)")
    saved = runs["save"][0]
    for result in runs["resume"][:3]:
        assert result["step"] == 2 and result["restored"] == saved["at_2"]
        assert result["trained"] == saved["at_4"]  # weights, moments and every rank's RNG came back
        assert result["progress"] == {"step": 2, "seen": [8]}


def test_sigkilled_rank_fails_the_save_on_every_other_rank(elastic):
    kind, base, runs = elastic
    if kind != "s3":
        pytest.skip("run on S3 only (launch cost)")
    assert runs["resume"][3] is None  # rank 3 was killed
    for result in runs["resume"][:3]:
        assert "saved" not in result and result["save_error"], result
        assert result["save_seconds"] < 60 and result["latest"] == 4
    store = open_storage(base["url"], **base["options"])
    assert not any(o.key == "checkpoint_step_00000006.ckpt" for o in store.list())


def test_restore_at_three_ranks_reshards_and_resumes_from_the_newest_complete(elastic):
    _, _, runs = elastic
    saved = runs["save"][0]
    for result in runs["at_3"]:
        assert result["step"] == 4 and result["restored"] == saved["at_4"], result
        assert result["progress"] == {"step": 4, "seen": [16]}
        assert result["saved"] == 5 and result["latest"] == 5
    assert len({r["trained"] for r in runs["at_3"]}) == 1
    assert sorted(r["parts_read"] for r in runs["at_3"]) == [2, 3, 3]  # the overlapping parts, not all 4


def test_restore_at_two_ranks(elastic):
    kind, _, runs = elastic
    if kind != "s3":
        pytest.skip("run on S3 only (launch cost)")
    for result in runs["at_2"]:
        assert result["step"] == 4 and result["restored"] == runs["save"][0]["at_4"]
    for result in runs["at_2_latest"]:
        assert result["step"] == 5 and result["restored"] == runs["at_3"][0]["trained"]


def test_one_process_loads_the_consolidated_model(elastic):
    _, base, runs = elastic
    with CheckpointManager(base["url"], storage_options=base["options"]) as mgr:
        assert [i.step for i in mgr.list()] == [2, 4, 5]
        loaded, info = mgr.load(4)
        model = torch.nn.Sequential(torch.nn.Linear(16, 12), torch.nn.Tanh(), torch.nn.Linear(12, 5))
        mgr.restore({"model": model}, 5, keys=["model"])  # evaluation / export: a plain module
    assert info.step == 4
    assert set(loaded["model"]) == {"0.weight", "0.bias", "2.weight", "2.bias"}
    assert loaded["model"]["2.weight"].shape == (5, 12)  # whole, from 4 uneven shards (2, 2, 1, 0 rows)
    assert loaded["progress"] == {"step": 4, "seen": [16]}
    assert len(loaded[RANKS_KEY]) == 4  # each rank's RNG
    assert loaded["optimizer"]["state"]["0.weight"]["exp_avg"].shape == (12, 16)
    assert model[0].weight.abs().sum() > 0
