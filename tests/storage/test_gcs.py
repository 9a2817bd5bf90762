"""GCSStorage against fake-gcs-server, and against a loopback server that only answers with errors."""

from __future__ import annotations

import datetime as dt
import random
import socket
from concurrent.futures import ThreadPoolExecutor

import google.auth.exceptions
import pytest
import requests
from google.cloud.storage.exceptions import DataCorruption

from cloudckpt.errors import (
    AlreadyExists,
    CloudCkptError,
    InvalidKey,
    NotFound,
    PermissionDenied,
    PreconditionFailed,
    TransientError,
)
from cloudckpt.hashing import crc32c_hex
from cloudckpt.storage import IfMatch, upload_multipart
from cloudckpt.storage.gcs import EXPIRED_CUSTOM_TIME_FIELD, GCSStorage, translate_error
from gcs_helpers import GCSErrorServer, drain_server_log

KiB = 1024
MiB = 1024 * KiB


@pytest.fixture
def gcs(fake_gcs):
    drain_server_log(fake_gcs)
    return fake_gcs


@pytest.fixture
def store(gcs):
    backend = GCSStorage(gcs.new_bucket(), "runs/exp", endpoint_url=gcs.endpoint_url)
    yield backend
    backend.close()


def record_requests(store: GCSStorage) -> list[tuple[str, str]]:
    """(method, url) of every request the store's client sends from now on."""
    seen: list[tuple[str, str]] = []
    store._client._http.hooks["response"].append(
        lambda response, *args, **kwargs: seen.append((response.request.method, response.request.url))
    )
    return seen


def bucket_names(gcs, bucket: str) -> list[str]:
    """Every object name in the bucket, hidden ones included, read with a separate client."""
    return sorted(blob.name for blob in gcs.client().list_blobs(bucket))


def parallel(fn, items, workers: int = 16) -> list:
    with ThreadPoolExecutor(workers) as pool:
        return list(pool.map(fn, items))


# -- conditional writes and upload paths ---------------------------------------
def test_create_and_if_match_are_enforced_on_simple_uploads(store):
    first = store.put("latest.ckpt", b"v1", mode="create")
    assert first.token.isdigit() and first.crc32c == crc32c_hex(b"v1")
    with pytest.raises(AlreadyExists, match="latest.ckpt"):
        store.put("latest.ckpt", b"again", mode="create")
    second = store.put("latest.ckpt", b"v2", mode=IfMatch(first.token))
    with pytest.raises(PreconditionFailed, match=f"gs://{store.bucket}/runs/exp/latest.ckpt"):
        store.put("latest.ckpt", b"stale", mode=IfMatch(first.token))
    with pytest.raises(PreconditionFailed, match="not a GCS generation"):
        store.put("latest.ckpt", b"etag", mode=IfMatch('"d41d8cd98f00b204"'))
    assert store.get("latest.ckpt") == b"v2"
    assert store.head("latest.ckpt").token == second.token


@pytest.mark.parametrize(
    ("threshold", "chunk", "size", "upload_type", "chunk_requests"),
    [
        (256 * KiB, 256 * KiB, 1 * MiB + 123, "resumable", 5),  # above threshold, SDK size unknown
        (8 * MiB, 4 * MiB, 9 * MiB, "resumable", 3),  # above the SDK's own 8 MiB
        (256 * KiB, 256 * KiB, 256 * KiB, "multipart", 0),  # at the threshold: one request
    ],
)
def test_upload_path_follows_the_threshold(gcs, threshold, chunk, size, upload_type, chunk_requests):
    store = GCSStorage(gcs.new_bucket(), endpoint_url=gcs.endpoint_url,
                       resumable_threshold=threshold, chunk_size=chunk)
    data = bytes(range(251)) * (size // 251) + b"x" * (size % 251)
    seen = record_requests(store)
    info = store.put("big.bin", memoryview(data))
    assert any(method == "POST" and f"uploadType={upload_type}" in url for method, url in seen)
    assert sum(method == "PUT" for method, _ in seen) == chunk_requests
    assert info.size == size and info.crc32c == crc32c_hex(data)
    assert store.get("big.bin") == data
    assert store.head("big.bin") == info
    store.close()


def test_ranged_reads_use_end_exclusive_ranges(store):
    store.put("r", b"0123456789")
    assert store.get("r", range=(0, 1)) == b"0"
    assert store.get("r", range=(7, 100)) == b"789"
    assert store.get("r", range=(4, 4)) == b""
    with pytest.raises(NotFound, match="missing"):
        store.get("missing", range=(3, 3))
    # Last: fake-gcs-server drops the connection after its 416 answer, and the next request
    # could catch the pooled connection before it sees the close (a TransientError).
    assert store.get("r", range=(10, 20)) == b""


# -- multipart through compose ---------------------------------------------------
def test_multipart_round_trips_and_cleans_up(gcs, store):
    data = bytes(range(256)) * 1000
    info = upload_multipart(store, "big/object", data, part_size=100_000, concurrency=4)
    assert info.size == len(data) and info.crc32c == crc32c_hex(data)
    assert store.get("big/object") == data
    assert store.head("big/object").token == info.token
    assert store.list_pending_uploads() == []
    assert bucket_names(gcs, store.bucket) == ["runs/exp/big/object"]


def test_more_than_32_parts_compose_in_a_tree_in_order(gcs, store):
    data = b"".join(f"<{n:03d}>".encode() for n in range(1, 71))  # 70 parts of 5 bytes
    info = upload_multipart(store, "tree", data, part_size=5, concurrency=8)
    assert store.get("tree") == data
    assert info.crc32c == crc32c_hex(data)
    assert bucket_names(gcs, store.bucket) == ["runs/exp/tree"]


def test_multipart_if_match_and_create(store):
    first = store.put("swap", b"old")
    upload_multipart(store, "swap", b"new!" * 10, mode=IfMatch(first.token), part_size=16)
    with pytest.raises(PreconditionFailed, match="swap"):
        upload_multipart(store, "swap", b"late" * 10, mode=IfMatch(first.token), part_size=16)
    with pytest.raises(AlreadyExists, match="swap"):
        upload_multipart(store, "swap", b"dupe" * 10, mode="create", part_size=16)
    assert store.get("swap") == b"new!" * 10
    assert store.list_pending_uploads() == []


def test_aborted_multipart_leaves_no_object_and_nothing_pending(gcs, store):
    upload = store.multipart("aborted/object")
    upload.upload_part(2, b"b" * 10)
    upload.upload_part(1, b"a" * 10)
    upload.abort()
    upload.abort()
    with pytest.raises(NotFound):
        upload.upload_part(3, b"late")
    with pytest.raises(NotFound):
        store.head("aborted/object")
    assert store.list_pending_uploads() == []
    assert bucket_names(gcs, store.bucket) == []


def test_pending_parts_are_hidden_listed_and_abortable(store):
    store.put(".cloudckpt/state.json", b"{}")
    before = dt.datetime.now(dt.timezone.utc) - dt.timedelta(minutes=1)
    for key in ("ckpt/a", "other/b"):
        upload = store.multipart(key)
        upload.upload_part(1, b"part one")
        upload.upload_part(2, b"part two")
    assert [i.key for i in store.list("")] == [".cloudckpt/state.json"]
    assert [i.key for i in store.list(".cloudckpt/")] == [".cloudckpt/state.json"]
    pending = store.list_pending_uploads()
    assert [p.key for p in pending] == ["ckpt/a", "other/b"]
    assert all(p.initiated is not None and p.initiated > before for p in pending)
    assert [p.key for p in store.list_pending_uploads("ckpt/")] == ["ckpt/a"]
    store.abort_pending_upload(pending[0])
    assert [p.key for p in store.list_pending_uploads()] == ["other/b"]
    with pytest.raises(InvalidKey, match="reserved"):
        store.put(".cloudckpt/uploads/x", b"no")


# -- listing, delete, lifecycle marks --------------------------------------------
def test_listing_more_than_a_thousand_keys_follows_pages(store):
    keys = [f"many/{i:05d}" for i in range(1001)]
    parallel(lambda key: store.put(key, b"x"), keys)
    seen = record_requests(store)
    assert [info.key for info in store.list("many/")] == keys
    assert sum("pageToken=" in url for _, url in seen) == 1


def test_delete_removes_many_keys_and_ignores_missing_ones(store):
    keys = [f"chunks/{i:03d}" for i in range(40)]
    parallel(lambda key: store.put(key, b"x"), keys)
    store.put("keep", b"y")
    store.delete(keys + ["chunks/never-existed"])
    assert [info.key for info in store.list("")] == ["keep"]


def test_mark_expired_sets_custom_time(gcs, store):
    store.put("chunks/old", b"x")
    before = dt.datetime.now(dt.timezone.utc) - dt.timedelta(seconds=5)
    store.mark_expired(["chunks/old", "chunks/never-existed"])
    blob = gcs.client().bucket(store.bucket).get_blob("runs/exp/chunks/old")
    assert EXPIRED_CUSTOM_TIME_FIELD in blob._properties
    assert before <= blob.custom_time <= dt.datetime.now(dt.timezone.utc) + dt.timedelta(seconds=5)
    assert store.get("chunks/old") == b"x"


def test_missing_bucket_is_named(gcs):
    store = GCSStorage("no-such-bucket-cloudckpt", endpoint_url=gcs.endpoint_url)
    with pytest.raises(NotFound, match="bucket 'no-such-bucket-cloudckpt' does not exist"):
        store.list("")
    with pytest.raises(NotFound, match="no-such-bucket-cloudckpt"):
        store.put("k", b"x")


# -- error translation over real HTTP --------------------------------------------
ERROR_CASES = [
    (403, "forbidden", "anon does not have storage.objects.get access", PermissionDenied),
    (401, "required", "Anonymous caller", PermissionDenied),
    (503, "backendError", "Backend Error", TransientError),
    (429, "rateLimitExceeded", "The rate of change requests is too high", TransientError),
    (500, "backendError", "Internal Error", TransientError),
    (404, "notFound", "The specified bucket does not exist.", NotFound),
]


@pytest.mark.parametrize(("status", "reason", "message", "expected"), ERROR_CASES)
def test_http_errors_are_translated_without_sdk_retries(status, reason, message, expected):
    with GCSErrorServer(status, reason, message) as server:
        store = GCSStorage("bkt", "pre", endpoint_url=server.endpoint_url, chunk_size=256 * KiB,
                           resumable_threshold=256 * KiB)
        calls = [
            lambda: store.get("k"), lambda: store.get("k", range=(0, 4)), lambda: store.head("k"),
            lambda: store.put("k", b"x"), lambda: store.put("k", b"x" * (300 * KiB)),
            lambda: store.list("p/"), lambda: store.copy("k", "k2"),
            lambda: store.multipart("k").upload_part(1, b"x"),
        ]
        for call in calls:
            with pytest.raises(expected) as excinfo:
                call()
            text = str(excinfo.value)
            assert "gs://bkt/pre/" in text and "http://" not in text
            # On a 401 the auth session asks the (anonymous) credentials for a refresh, which fails.
            assert str(status) in text or status == 401
            assert excinfo.value.__cause__ is not None
        # One request per call: the SDK did not retry.  (google-cloud-storage 3.17 also fetches
        # bucket metadata in a background thread, GET /storage/v1/b/bkt; not counted.)
        assert len([path for _, path in server.requests if "/o" in path]) == len(calls)
        store.close()
    if expected is PermissionDenied:
        assert "Application Default Credentials" in text
    if expected is NotFound:
        assert "bucket 'bkt' does not exist" in text


def test_refused_connection_is_transient():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    store = GCSStorage("bkt", endpoint_url=f"http://127.0.0.1:{port}")
    with pytest.raises(TransientError, match="gs://bkt/k"):
        store.get("k")


@pytest.mark.parametrize(
    ("exc", "expected"),
    [
        (DataCorruption(None, "crc32c mismatch"), TransientError),
        (requests.exceptions.ChunkedEncodingError("reset"), TransientError),
        (google.auth.exceptions.TransportError("metadata server unreachable"), TransientError),
        (google.auth.exceptions.RefreshError("invalid_grant"), PermissionDenied),
    ],
)
def test_non_http_failures_are_translated(exc, expected):
    error = translate_error(exc, "get", "bkt", "a/b")
    assert type(error) is expected and "get gs://bkt/a/b" in str(error)


def test_emulator_and_endpoint_skip_adc_but_real_gcs_needs_it(gcs, monkeypatch):
    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", "/nonexistent/adc.json")
    monkeypatch.delenv("STORAGE_EMULATOR_HOST")
    GCSStorage(gcs.new_bucket(), endpoint_url=gcs.endpoint_url).put("k", b"anonymous")
    with pytest.raises(PermissionDenied, match="Application Default Credentials"):
        GCSStorage("bkt")


@pytest.mark.parametrize(
    "options",
    [{"chunk_size": 100 * KiB}, {"chunk_size": 0}, {"resumable_threshold": 9 * MiB}, {"resumable_threshold": -1}],
)
def test_bad_sizes_are_refused(options):
    with pytest.raises(ValueError):
        GCSStorage("bkt", endpoint_url="http://127.0.0.1:9", **options)


def test_prefixes_isolate_stores_in_one_bucket(gcs):
    bucket = gcs.new_bucket()
    one = GCSStorage(bucket, "one", endpoint_url=gcs.endpoint_url)
    two = GCSStorage(bucket, "/one2/", endpoint_url=gcs.endpoint_url)
    one.put("k", b"1")
    two.put("k", b"2")
    assert two.url == f"gs://{bucket}/one2"
    assert [(i.key, i.size) for i in one.list("")] == [("k", 1)]
    assert one.copy("k", "k-copy").size == 1
    assert [i.key for i in two.list("")] == ["k"]
    with pytest.raises(CloudCkptError):
        one.copy("missing", "x")


def test_writes_leave_pythons_global_random_stream_alone(store):
    """The SDK draws multipart boundaries from `random`; a save must not move the training's stream."""
    random.seed(1234)
    expected = [random.random() for _ in range(3)]
    random.seed(1234)
    store.put("rng/a", b"x" * 10, mode="create")
    store.put("rng/b", b"y" * 10)
    assert [random.random() for _ in range(3)] == expected
