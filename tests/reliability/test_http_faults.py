"""Faults at the HTTP level, on S3 (moto) and on GCS (fake-gcs-server), through fault_proxy.FaultProxy.

1. A 30 % storm of every transient fault the proxy knows (503 SlowDown / 429 with Retry-After,
   500, resets before the request, halfway through its body, after it was applied and halfway
   through the answer, truncated answers, answers held past the read timeout) over saves with
   retention, restores, ``verify`` and a copy to a second root.  Every operation succeeds.
2. The lost response (applied upstream, then the connection reset) on every kind of write:
   the create-only manifest, the compare-and-swap of a pointer and of the run index, the
   multipart complete (S3 CompleteMultipartUpload, GCS compose), a resumable upload (GCS), and
   deletes.  The operation succeeds and the write happened once.

After each: the root resolves to a verified checkpoint, latest never moved back, no manifest
references a missing chunk, nothing committed is lost (http_util.check_root).
``CLOUDCKPT_HTTP_SWEEP=full`` runs the storm with five seeds per backend instead of one.
"""

from __future__ import annotations

import re
from urllib.parse import unquote

import pytest
from fault_proxy import ALL_TRANSIENT_WEIGHTS, FaultProxy, Rule
from http_util import (
    CountingPolicy,
    check_root,
    full_sweep,
    http_store,
    loss,
    manager,
    new_prefix,
    populate,
)
from reliability_util import blank_like, report, same_state, step_state

from cloudckpt.copy import Copier

STORM_SEEDS = [1301, 1302, 1303, 1304, 1305] if full_sweep() else [1301]
SERVERS = {"s3": "moto_s3", "gcs": "fake_gcs"}


@pytest.fixture(params=["s3", "gcs"])
def backend(request):
    return request.param, request.getfixturevalue(SERVERS[request.param])


# -- 1. the storm ------------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", STORM_SEEDS)
def test_a_30_percent_http_fault_storm_is_absorbed(backend, seed):
    flavor, server = backend
    bucket = server.new_bucket()
    saves = 3
    with FaultProxy(server.endpoint_url, flavor=flavor, fault_rate=0.3, seed=seed, slow_seconds=0.8,
                    weights=ALL_TRANSIENT_WEIGHTS) as proxy:
        policy = CountingPolicy()
        store = http_store(flavor, bucket, proxy.endpoint_url, read_timeout=0.5, policy=policy)
        mgr = manager(store, keep=2)
        for step in range(1, saves + 1):
            mgr.save(step_state(step), step=step, metrics={"loss": loss(step)})
        target = blank_like(step_state(0))
        assert mgr.restore(target).step == saves and same_state(target, step_state(saves))
        mgr.verify()
        copy_to = http_store(flavor, bucket, proxy.endpoint_url, "copy", read_timeout=0.5, policy=policy)
        copier = Copier(store, copy_to)
        copied = [copier.copy(info.name) for info in mgr.list()]
        copy_mgr = manager(copy_to)
        copy_mgr.verify()
        proxy.drain()  # late ("slow") requests have now reached the server
        outcomes = proxy.outcomes
        requests = len(proxy.log)
    direct = http_store(flavor, bucket, server.endpoint_url)
    counts = check_root(direct, required={"checkpoint_step_00000002.ckpt", "checkpoint_step_00000003.ckpt"},
                        latest_at_least=saves, where=f"{flavor} storm seed={seed}")
    copy_direct = http_store(flavor, bucket, server.endpoint_url, "copy")
    copy_counts = check_root(copy_direct, required={s.name for s in copied}, latest_at_least=saves,
                             where=f"{flavor} storm copy seed={seed}")
    faulted = requests - outcomes["forwarded"]
    report(f"[http storm] {flavor} seed={seed}: {requests} requests, {faulted} faulted "
           f"({', '.join(f'{k}: {v}' for k, v in sorted(outcomes.items()) if k != 'forwarded')}), "
           f"{len(policy.sleeps)} retries; saves ok {saves}/{saves}, restore + verify ok, copies ok "
           f"{len(copied)}/{len(copied)}; checkpoints checked: {counts['checked'] + copy_counts['checked']}, "
           f"partial: 0, missing chunks: 0, latest moved back: 0, lost: 0")
    assert faulted >= 0.2 * requests
    assert {"503", "429", "reset", "reset_after", "truncate", "reset_mid_response"} <= set(outcomes), outcomes


# -- 2. the lost response on every kind of write -----------------------------------------------------
def _object_of(path: str, body: bytes) -> str:
    """The object name a request writes: in the path (S3, GCS compose/delete) or, for a GCS upload,
    in the query (resumable start) or the JSON metadata of the multipart body."""
    gcs_upload = "uploadType=multipart" in path
    match = re.search(rb'"name":\s*"([^"]+)"', body[:4096]) if gcs_upload else None
    if match:
        return match.group(1).decode()
    found = re.search(r"[?&]name=([^&]+)", path)
    return unquote(found.group(1)) if found else unquote(path.split("?")[0])


def _conditional(path: str) -> bool:
    return "ifGenerationMatch=" in path


# name -> (flavor or None for both, operation, predicate on (method, path, body)).
WRITES = {
    "create-only manifest": (None, "save", lambda m, p, b: _writes(m, p, b, "checkpoint_step_00000003.ckpt")),
    "CAS of latest.ckpt": (None, "save", lambda m, p, b: _writes(m, p, b, "latest.ckpt")),
    "CAS of the run index": (None, "save", lambda m, p, b: _writes(m, p, b, ".cloudckpt/state.json")),
    "multipart complete": ("s3", "save", lambda m, p, b: m == "POST" and "uploadId=" in p),
    "compose": ("gcs", "save", lambda m, p, b: m == "POST" and p.split("?")[0].endswith("/compose")),
    "resumable upload": ("gcs", "save", lambda m, p, b: m == "PUT" and "upload_id=" in p),
    "delete of a manifest": (None, "save", lambda m, p, b: (m == "DELETE" and "checkpoint_step" in unquote(p))
                             or (m == "POST" and re.search(r"\?delete(=|&|$)", p) is not None
                                 and b"checkpoint_step" in b)),
}


def _writes(method: str, path: str, body: bytes, name: str) -> bool:
    """Whether a request is a single-request write (PUT, GCS simple upload) of object ``name``."""
    return (method in ("PUT", "POST") and "uploadId=" not in path and "upload_id=" not in path
            and not path.split("?")[0].endswith("/compose") and _object_of(path, body).endswith(name))


def test_a_lost_response_on_every_kind_of_write_is_absorbed(backend):
    """One save (with retention), in which the first request of each kind of write loses its response."""
    flavor, server = backend
    kinds = [write for write, (only, _, _) in WRITES.items() if only in (None, flavor)]
    bucket = server.new_bucket()
    prefix = new_prefix()
    populate(http_store(flavor, bucket, server.endpoint_url, prefix))
    rules = {write: Rule(WRITES[write][2], "reset_after") for write in kinds}
    policy = CountingPolicy()
    with FaultProxy(server.endpoint_url, flavor=flavor, rules=list(rules.values())) as proxy:
        store = http_store(flavor, bucket, proxy.endpoint_url, prefix, policy=policy)
        manager(store).save(step_state(3), step=3, metrics={"loss": loss(3)})  # KeepLastN(2): removes step 1
        lost = [e for e in proxy.log if e.outcome == "reset_after"]
    missed = [write for write, rule in rules.items() if rule.hits != 1]
    assert not missed, f"never seen: {missed}; requests: {[(e.method, e.path) for e in proxy.log]}"
    assert len(lost) == len(kinds) and len(policy.sleeps) >= len(kinds), (lost, policy.sleeps)
    direct = http_store(flavor, bucket, server.endpoint_url, prefix)
    assert "checkpoint_step_00000001.ckpt" not in {i.key for i in direct.list("", recursive=False)}
    counts = check_root(direct, required={"checkpoint_step_00000002.ckpt", "checkpoint_step_00000003.ckpt"},
                        latest_at_least=3,
                        where=f"{flavor} lost responses")
    report(f"[http lost response] {flavor}: writes whose response was lost after they took effect: "
           f"{len(kinds)} ({', '.join(kinds)}); the save and its retention ok, {len(policy.sleeps)} retries; "
           f"checkpoints checked: {counts['checked']}; latest moved back: 0, missing chunks: 0, lost: 0")
