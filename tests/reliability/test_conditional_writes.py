"""Stores as they really are: the capability probe, stores that ignore conditional writes, optional calls.

The store that ignores conditional writes is real: fault_proxy.FaultProxy(strip_conditions=True)
in front of moto removes ``If-None-Match`` / ``If-Match``, and in front of fake-gcs-server the
``ifGenerationMatch`` query parameters, so the server applies every write unconditionally.

1. The probe finds moto and fake-gcs-server enforcing both conditions, and the stripped stores
   ignoring them; ``cloudckpt doctor`` prints it (its output is part of the counts summary).
2. A store that ignores them is refused on the first write with an error that names the store,
   what was observed, why it matters and the option that accepts it; nothing is written.
3. Accepted with ``conditional_writes="unsupported"`` (single-writer mode), saves work, and the
   read-after-write checks catch a second writer after the fact: a replaced manifest fails the
   save, a pointer moved back is moved forward again, a lost pin is re-applied, each with an ERROR.
4. A store without ListMultipartUploads costs one WARNING, not an ERROR on every save.
"""

from __future__ import annotations

import json
import logging
import re

import pytest
import torch
from fault_proxy import FaultProxy
from reliability_util import KiB, blank_like, invoke_cli, report, same_state, step_state

from cloudckpt import AlreadyExists, CheckpointManager, KeepLastN, TransferConfig
from cloudckpt.pointers import LATEST_POINTER, STATE_KEY, read_pointer
from cloudckpt.storage import open_storage
from cloudckpt.storage.capabilities import ConditionalWritesIgnored, forget_cached, probe
from cloudckpt.storage.faults import FaultyStorage

TRANSFER = TransferConfig(chunk_size=64 * KiB, pack_threshold=8 * KiB)
FLAVORS = {"s3": ("moto_s3", "s3"), "gcs": ("fake_gcs", "gs")}


@pytest.fixture(params=["s3", "gcs"])
def server(request):
    fixture, scheme = FLAVORS[request.param]
    return request.param, scheme, request.getfixturevalue(fixture)


@pytest.fixture
def stripping(server):
    """(flavor, root URL, endpoint of a proxy that strips every write condition)."""
    flavor, scheme, upstream = server
    with FaultProxy(upstream.endpoint_url, flavor=flavor, strip_conditions=True) as proxy:
        yield flavor, f"{scheme}://{upstream.new_bucket()}/run", proxy.endpoint_url


def _manager(url: str, endpoint: str, **options) -> CheckpointManager:
    options.setdefault("capture_rng", False)
    return CheckpointManager(url, storage_options={"endpoint_url": endpoint, **options.pop("storage", {})},
                             transfer=TRANSFER, **options)


def _doctor(root: str, endpoint: str | None = None) -> tuple[int, str, dict]:
    """``cloudckpt doctor`` as text, and the fields its ``--json`` form gives."""
    extra = ["--endpoint-url", endpoint] if endpoint else []
    text = invoke_cli(["doctor", root, *extra])
    fields = {"create_only": re.search(r"create-only writes\s+(\w+)", text.output).group(1),
              "if_match": re.search(r"If-Match writes\s+(\w+)", text.output).group(1)}
    fields["conditional_writes"] = fields["create_only"] == fields["if_match"] == "enforced"
    return text.exit_code, text.output, fields


# -- 1. the probe and doctor ---------------------------------------------------------------------
def test_doctor_on_the_emulators_a_directory_and_a_store_that_ignores_conditions(moto_s3, fake_gcs, tmp_path):
    roots = {
        "moto": (f"s3://{moto_s3.new_bucket()}/run", moto_s3.endpoint_url, None),
        "fake-gcs-server": (f"gs://{fake_gcs.new_bucket()}/run", fake_gcs.endpoint_url, None),
        "local directory": (str(tmp_path), None, None),
        "moto behind a header-stripping proxy": (f"s3://{moto_s3.new_bucket()}/run", None, ("s3", moto_s3)),
        "fake-gcs-server behind a parameter-stripping proxy": (f"gs://{fake_gcs.new_bucket()}/run", None,
                                                               ("gcs", fake_gcs)),
    }
    lines = []
    for label, (root, endpoint, strip) in roots.items():
        if strip is None:
            code, text, body = _doctor(root, endpoint)
        else:
            with FaultProxy(strip[1].endpoint_url, flavor=strip[0], strip_conditions=True) as proxy:
                code, text, body = _doctor(root, proxy.endpoint_url)
        ignoring = strip is not None
        assert code == (1 if ignoring else 0), text
        assert body["create_only"] == body["if_match"] == ("ignored" if ignoring else "enforced"), body
        assert body["conditional_writes"] is (not ignoring)
        assert ("REFUSED" in text) is ignoring and ("OK" in text) is (not ignoring), text
        if endpoint or ignoring:
            assert "chosen by the endpoint_url option" in text
        lines.append(f"[doctor] {label}: $ cloudckpt doctor {root}\n" + text.rstrip())
    # The probe cleans up after itself; --json gives the same as fields.
    assert not [p for p in tmp_path.rglob("*") if p.is_file()]
    as_json = json.loads(invoke_cli(["doctor", str(tmp_path), "--json"]).output)
    assert as_json["conditional_writes"] is True and as_json["backend"] == "LocalStorage", as_json
    assert as_json["checksums"] == "not reported" and as_json["upload_listing"] == "supported"
    for line in lines:
        report(line)


def test_the_probe_runs_once_per_process_and_store(moto_s3):
    forget_cached()
    bucket = moto_s3.new_bucket()
    with FaultProxy(moto_s3.endpoint_url) as proxy:
        first = _manager(f"s3://{bucket}/a", proxy.endpoint_url)
        first.save(step_state(1), step=1)
        probes = [e for e in proxy.log if ".cloudckpt/probe/" in e.path or "uploads" in e.path]
        second = _manager(f"s3://{bucket}/b", proxy.endpoint_url)
        second.save(step_state(1), step=1)
        again = [e for e in proxy.log if ".cloudckpt/probe/" in e.path or "uploads" in e.path]
    caps = first.store.capabilities
    assert caps is not None and caps.conditional_writes and caps.create_only == "enforced"
    assert caps.checksums == "reported" and caps.upload_listing == "supported"
    assert second.store.capabilities is not None and second.store.capabilities.store.endswith("/b")
    assert len(probes) == 6 and len(again) == len(probes), [e.path for e in again]  # 5 on the key + list uploads
    assert not moto_s3.client().list_objects_v2(Bucket=bucket, Prefix="a/.cloudckpt/probe/").get("Contents")


def test_reading_never_probes(moto_s3):
    forget_cached()
    bucket = moto_s3.new_bucket()
    _manager(f"s3://{bucket}/run", moto_s3.endpoint_url).save(step_state(1), step=1)
    forget_cached()
    with FaultProxy(moto_s3.endpoint_url) as proxy:
        reader = _manager(f"s3://{bucket}/run", proxy.endpoint_url)
        reader.restore(blank_like(step_state(1)))
        reader.verify()
    assert reader.store.capabilities is None
    assert not [e for e in proxy.log if e.method in ("PUT", "POST", "DELETE")]


# -- 2. refused by default -----------------------------------------------------------------------
def test_a_store_that_ignores_conditional_writes_is_refused_by_default(stripping, server):
    flavor, url, endpoint = stripping
    mgr = _manager(url, endpoint)
    with pytest.raises(ConditionalWritesIgnored) as refused:
        mgr.save(step_state(1), step=1)
    message = str(refused.value)
    for needed in (url, endpoint, "If-None-Match", "succeeded and replaced", "second writer",
                   "conditional_writes", "unsupported", "single-writer"):
        assert needed in message, (needed, message)
    assert mgr.list() == []
    store = open_storage(url, endpoint_url=server[2].endpoint_url)
    assert [i.key for i in store.list("")] == []  # not even the probe object is left
    # `cloudckpt cp` into such a store is refused the same way.
    source = url.replace("/run", "/source")
    _manager(source, server[2].endpoint_url).save(step_state(1), step=1)
    copied = invoke_cli(["cp", source, url, "--src-endpoint-url", server[2].endpoint_url,
                         "--dst-endpoint-url", endpoint, "--no-progress"])
    assert copied.exit_code == 1 and "ignores conditional writes" in copied.output, copied.output
    assert [i.key for i in store.list("")] == []


# -- 3. single-writer mode -----------------------------------------------------------------------
class Interleaved(FaultyStorage):
    """Lets "another writer" write ``key`` right after this writer's own write of it (once)."""

    def __init__(self, inner, key: str, other: bytes | None = None, *, mode: str | None = None) -> None:
        super().__init__(inner)
        self.key, self.other, self.mode = key, other, mode
        self.fired = False

    def put(self, key, data, mode="overwrite"):
        info = super().put(key, data, mode)
        if key == self.key and not self.fired and (self.mode is None or mode == self.mode):
            self.fired = True
            self.inner.put(key, self.other if self.other is not None else bytes(data) + b" ", "overwrite")
        return info


def _single_writer(url: str, endpoint: str, wrap=None, **options) -> CheckpointManager:
    store = open_storage(url, endpoint_url=endpoint)
    if wrap is not None:
        store = wrap(store)
    return CheckpointManager(store, storage_options={"conditional_writes": "unsupported"},
                             transfer=TRANSFER, capture_rng=False, **options)


def test_single_writer_mode_saves_restores_and_refuses_an_existing_name(stripping, caplog):
    flavor, url, endpoint = stripping
    mgr = _single_writer(url, endpoint, retention=KeepLastN(1))
    for step in (1, 2):
        mgr.save(step_state(step), step=step)
    assert mgr.store.capabilities.single_writer and not mgr.store.capabilities.conditional_writes
    assert [i.step for i in mgr.list()] == [2]
    target = blank_like(step_state(0))
    assert mgr.restore(target).step == 2 and same_state(target, step_state(2))
    before = mgr.store.get("checkpoint_step_00000002.ckpt")
    with pytest.raises(AlreadyExists):  # the store would have let it overwrite: the HEAD before refuses
        _single_writer(url, endpoint).save(step_state(20), step=2)
    assert mgr.store.get("checkpoint_step_00000002.ckpt") == before
    assert sum("single-writer mode" in r.getMessage() for r in caplog.records if r.levelno == logging.WARNING) <= 1


def test_single_writer_mode_detects_lost_races_after_the_fact(stripping, caplog):
    flavor, url, endpoint = stripping
    caplog.set_level(logging.ERROR, logger="cloudckpt")
    detected = 0

    # A pointer moved back by a zombie right after our write: detected and moved forward again.
    _single_writer(url, endpoint).save(step_state(1), step=1)
    zombie_latest = read_pointer(open_storage(url, endpoint_url=endpoint), LATEST_POINTER).to_bytes()
    mgr = _single_writer(url, endpoint, wrap=lambda s: Interleaved(s, LATEST_POINTER, zombie_latest))
    mgr.save(step_state(2), step=2)
    assert read_pointer(mgr.store, LATEST_POINTER).step == 2
    detected += 1

    # A pin lost to a zombie's stale index write: detected and re-applied.
    stale_index = mgr.store.get(STATE_KEY)
    mgr = _single_writer(url, endpoint, wrap=lambda s: Interleaved(s, STATE_KEY, stale_index))
    mgr.pin("checkpoint_step_00000001.ckpt")
    assert mgr.pinned() == {"checkpoint_step_00000001.ckpt"}
    detected += 1

    # A manifest replaced by another writer's commit of the same name: this save fails loudly.
    other = _single_writer(url, endpoint).store.get("checkpoint_step_00000001.ckpt")
    mgr = _single_writer(url, endpoint, wrap=lambda s: Interleaved(s, "checkpoint_step_00000003.ckpt", other,
                                                                   mode="create"))
    with pytest.raises(AlreadyExists, match="another writer committed"):
        mgr.save(step_state(3), step=3)
    detected += 1

    races = [r for r in caplog.records if "LOST RACE" in r.getMessage() and r.levelno == logging.ERROR]
    assert len(races) == detected, [r.getMessage() for r in races]
    report(f"[single-writer] {flavor} behind a condition-stripping proxy: lost races provoked: {detected} "
           f"(latest moved back, pin lost, manifest replaced), detected with an ERROR: {len(races)}, "
           f"latest left moved back: 0, pins lost: 0")


# -- 4. optional calls ---------------------------------------------------------------------------
def test_a_store_without_upload_listing_costs_one_warning(moto_s3, caplog):
    forget_cached()
    caplog.set_level(logging.WARNING)
    bucket = moto_s3.new_bucket()
    with FaultProxy(moto_s3.endpoint_url, no_upload_listing=True) as proxy:
        mgr = _manager(f"s3://{bucket}/run", proxy.endpoint_url, retention=KeepLastN(1))
        for step in (1, 2, 3):
            mgr.save(step_state(step), step=step)
        mgr.prune()
    assert mgr.store.capabilities.upload_listing == "unsupported"
    ours = [r for r in caplog.records if r.name.startswith("cloudckpt")]
    assert not [r for r in ours if r.levelno >= logging.ERROR], [r.getMessage() for r in ours]
    warnings = [r.getMessage() for r in ours if "multipart uploads" in r.getMessage()]
    assert len(warnings) == 1 and "lifecycle rule" in warnings[0], warnings
    assert [i.step for i in mgr.list()] == [3]


def test_probe_of_a_memory_store_is_by_construction():
    mgr = CheckpointManager("memory://", capture_rng=False)
    mgr.save({"w": torch.ones(3)}, step=1)
    caps = mgr.store.capabilities
    assert caps.conditional_writes and not caps.probed
    assert probe(mgr.store).conditional_writes  # and a real probe agrees
