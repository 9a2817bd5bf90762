"""S3Storage against moto's real HTTP server, plus a loopback stub for the errors moto won't produce."""

from __future__ import annotations

import socket

import pytest
from botocore.exceptions import (
    ClientError,
    EndpointConnectionError,
    FlexibleChecksumError,
    NoCredentialsError,
    ReadTimeoutError,
)
from http_stub import CannedResponse, StubHTTPServer, s3_error
from servers import AWS_TEST_ENV

from cloudckpt.errors import (
    AlreadyExists,
    CloudCkptError,
    NotFound,
    PermissionDenied,
    PreconditionFailed,
    TransientError,
)
from cloudckpt.hashing import crc32c_hex
from cloudckpt.storage import IfMatch, RetryingStorage, open_storage, upload_multipart
from cloudckpt.storage.lifecycle import EXPIRED_TAG_KEY, EXPIRED_TAG_VALUE
from cloudckpt.storage.s3 import S3Storage, translate_error

MiB = 1024 * 1024
PART = 5 * MiB
SECRET = AWS_TEST_ENV["AWS_SECRET_ACCESS_KEY"]


@pytest.fixture
def bucket(moto_s3) -> str:
    return moto_s3.new_bucket()


@pytest.fixture
def store(moto_s3, bucket):
    with S3Storage(bucket, "runs/exp", endpoint_url=moto_s3.endpoint_url) as s3:
        yield s3


@pytest.fixture
def raw(moto_s3):
    """A plain boto3 client on moto, to look behind the store and to watch its requests."""
    client = moto_s3.client()
    yield client
    client.close()


def _record(client, operation: str) -> list[dict]:
    """Collect the headers of every ``operation`` request the client sends."""
    sent: list[dict] = []
    client.meta.events.register(f"before-send.s3.{operation}", lambda request, **_: sent.append(dict(request.headers)))
    return sent


def _pattern(size: int) -> bytes:
    return bytes(range(251)) * (size // 251) + bytes(size % 251)


# -- layout, tokens, checksums ------------------------------------------------
def test_url_and_keys_live_under_the_prefix(moto_s3, bucket, raw):
    with S3Storage(bucket, "/runs/exp/", endpoint_url=moto_s3.endpoint_url) as s3:
        assert s3.url == f"s3://{bucket}/runs/exp"
        s3.put("a/b.bin", b"x")
        assert [i.key for i in s3.list()] == ["a/b.bin"]
    raw.put_object(Bucket=bucket, Key="runs/expanded", Body=b"not ours")
    assert [o["Key"] for o in raw.list_objects_v2(Bucket=bucket)["Contents"]] == ["runs/exp/a/b.bin", "runs/expanded"]
    assert S3Storage(bucket, endpoint_url=moto_s3.endpoint_url).url == f"s3://{bucket}/"


def test_token_is_the_quoted_etag_everywhere(store):
    put = store.put("k", b"abc")
    assert put.token.startswith('"') and put.token.endswith('"')
    assert store.head("k").token == put.token == store.list("k")[0].token


def test_put_sends_crc32c_and_head_reports_it(store, raw, bucket):
    data = b"checksummed bytes"
    assert store.put("c", data).crc32c == crc32c_hex(data)
    assert store.head("c").crc32c == crc32c_hex(data)
    stored = raw.head_object(Bucket=bucket, Key="runs/exp/c", ChecksumMode="ENABLED")
    assert "ChecksumCRC32C" in stored


def test_ranges_past_the_end_return_what_exists(store):
    store.put("r", b"0123456789")
    store.put("empty", b"")
    assert store.get("r", range=(8, 100)) == b"89"
    assert store.get("r", range=(10, 20)) == b""
    assert store.get("r", range=(50, 60)) == b""
    assert store.get("empty", range=(0, 10)) == b""
    assert store.get("empty") == b""


def test_open_storage_builds_a_retrying_s3_store(moto_s3, bucket):
    with open_storage(f"s3://{bucket}/p/q", endpoint_url=moto_s3.endpoint_url) as opened:
        assert isinstance(opened, RetryingStorage) and isinstance(opened.inner, S3Storage)
        opened.put("k", b"v", mode="create")
        assert opened.get("k") == b"v"


# -- conditional writes, enforced by the server --------------------------------
def test_create_and_if_match_are_refused_by_the_server(moto_s3, bucket, raw):
    puts = _record(raw, "PutObject")
    with S3Storage(bucket, endpoint_url=moto_s3.endpoint_url, client=raw) as s3:
        first = s3.put("p", b"1", mode="create")
        with pytest.raises(AlreadyExists) as exists:
            s3.put("p", b"2", mode="create")
        s3.put("p", b"3", mode=IfMatch(first.token))
        with pytest.raises(PreconditionFailed) as stale:
            s3.put("p", b"4", mode=IfMatch(first.token))
        assert s3.get("p") == b"3"
    assert puts[0]["If-None-Match"] == b"*" and puts[2]["If-Match"] == first.token.encode()
    for refused in (exists.value, stale.value):
        assert isinstance(refused.__cause__, ClientError)
        assert refused.__cause__.response["ResponseMetadata"]["HTTPStatusCode"] == 412
        assert f"s3://{bucket}/p" in str(refused)


def test_multipart_complete_sends_the_conditions(moto_s3, bucket, raw):
    completes = _record(raw, "CompleteMultipartUpload")
    with S3Storage(bucket, endpoint_url=moto_s3.endpoint_url, client=raw) as s3:
        created = upload_multipart(s3, "m", b"a" * 10, mode="create")
        with pytest.raises(AlreadyExists) as exists:
            upload_multipart(s3, "m", b"b" * 10, mode="create")
        upload_multipart(s3, "m", b"c" * 10, mode=IfMatch(created.token))
        assert s3.get("m") == b"c" * 10
        assert s3.list_pending_uploads() == []
    assert [h.get("If-None-Match") for h in completes] == [b"*", b"*", None]
    assert completes[2]["If-Match"] == created.token.encode()
    assert exists.value.__cause__.response["ResponseMetadata"]["HTTPStatusCode"] == 412


def test_multipart_if_match_with_a_stale_token_is_refused(store):
    old = store.put("pointer", b"v1")
    store.put("pointer", b"v2")
    with pytest.raises(PreconditionFailed):
        upload_multipart(store, "pointer", b"v3", mode=IfMatch(old.token))
    store.delete(["pointer"])
    with pytest.raises(PreconditionFailed):
        upload_multipart(store, "pointer", b"v4", mode=IfMatch(old.token))
    assert store.list_pending_uploads() == []


# -- multipart -----------------------------------------------------------------
def test_three_part_upload_round_trips(store):
    data = _pattern(2 * PART + 12345)
    info = upload_multipart(store, "big", memoryview(data), part_size=PART, concurrency=3)
    assert info.size == len(data) and info.token.endswith('-3"')
    assert store.get("big") == data
    assert store.get("big", range=(PART - 3, PART + 3)) == data[PART - 3 : PART + 3]
    assert store.head("big").size == len(data)
    assert store.list_pending_uploads() == []


def test_parts_below_the_minimum_are_refused_at_complete(store):
    upload = store.multipart("small-parts")
    upload.upload_part(1, b"x" * 10)
    upload.upload_part(2, b"y" * 10)
    with pytest.raises(CloudCkptError, match="EntityTooSmall"):
        upload.complete()
    assert store.list_pending_uploads() == []


def test_transient_failure_of_complete_leaves_it_retryable(moto_s3, bucket, raw):
    def drop(**_):
        raise EndpointConnectionError(endpoint_url=moto_s3.endpoint_url)

    with S3Storage(bucket, endpoint_url=moto_s3.endpoint_url, client=raw) as s3:
        upload = s3.multipart("retry-me", mode="create")
        upload.upload_part(1, b"data")
        raw.meta.events.register("before-send.s3.CompleteMultipartUpload", drop)
        with pytest.raises(TransientError, match="complete multipart upload of s3://"):
            upload.complete()
        raw.meta.events.unregister("before-send.s3.CompleteMultipartUpload", drop)
        assert [p.key for p in s3.list_pending_uploads()] == ["retry-me"]
        assert upload.complete().size == 4
        assert s3.get("retry-me") == b"data"


def test_abort_leaves_no_object_and_no_pending_upload(store):
    upload = store.multipart("gone")
    upload.upload_part(1, b"z" * PART)
    assert [p.key for p in store.list_pending_uploads()] == ["gone"]
    upload.abort()
    upload.abort()
    with pytest.raises(NotFound):
        store.head("gone")
    assert store.list_pending_uploads() == []


def test_pending_uploads_are_listed_and_aborted(store):
    for key in ("b/two", "a/one", "elsewhere"):
        store.multipart(key).upload_part(1, b"p")
    pending = store.list_pending_uploads("a/") + store.list_pending_uploads("b/")
    assert [p.key for p in pending] == ["a/one", "b/two"] and all(p.initiated for p in pending)
    for p in store.list_pending_uploads():
        store.abort_pending_upload(p)
        store.abort_pending_upload(p)
    assert store.list_pending_uploads() == []


def test_large_copies_go_part_by_part(moto_s3, bucket, raw):
    copies = _record(raw, "UploadPartCopy")
    with S3Storage(bucket, endpoint_url=moto_s3.endpoint_url, part_size=PART, client=raw) as s3:
        s3.max_copy_object_size = PART
        data = _pattern(2 * PART + 7)
        s3.put("src", data)
        info = s3.copy("src", "dst")
        assert info.size == len(data) and s3.get("dst") == data
    assert len(copies) == 3


# -- listing, deleting, lifecycle marks ------------------------------------------
def test_list_pages_and_delete_batches_past_a_thousand_keys(moto_s3, bucket, raw):
    lists, deletes = _record(raw, "ListObjectsV2"), _record(raw, "DeleteObjects")
    keys = [f"k/{i:05d}" for i in range(1100)]
    moto_s3.seed(bucket, [f"pre/{k}" for k in keys])  # straight into moto: 1100 PUTs would take ~12 s
    with S3Storage(bucket, "pre", endpoint_url=moto_s3.endpoint_url, client=raw) as s3:
        assert [i.key for i in s3.list("k/")] == keys
        assert len(lists) == 2
        s3.delete(keys + ["k/missing"])
        assert len(deletes) == 2
        assert s3.list() == []
        s3.delete([])
        assert len(deletes) == 2


def test_mark_expired_tags_objects_and_skips_missing_ones(store, raw, bucket):
    store.put("chunks/old", b"x")
    store.mark_expired(["chunks/old", "chunks/never-existed"])
    tags = raw.get_object_tagging(Bucket=bucket, Key="runs/exp/chunks/old")["TagSet"]
    assert tags == [{"Key": EXPIRED_TAG_KEY, "Value": EXPIRED_TAG_VALUE}]


def test_missing_bucket_is_not_found_and_named(moto_s3):
    with S3Storage("no-such-bucket-here", endpoint_url=moto_s3.endpoint_url) as s3:
        with pytest.raises(NotFound, match="bucket 'no-such-bucket-here' does not exist"):
            s3.get("k")
        with pytest.raises(NotFound, match="no-such-bucket-here"):
            s3.head("k")


# -- errors moto cannot produce: a loopback stub speaking S3's error format --------
@pytest.fixture
def aws_env(monkeypatch):
    for name, value in AWS_TEST_ENV.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("AWS_PROFILE", raising=False)


def _stub_store(server: StubHTTPServer) -> S3Storage:
    return S3Storage("bkt", "pre", endpoint_url=server.endpoint_url, region="us-east-1")


@pytest.mark.parametrize(
    "code, message",
    [
        ("AccessDenied", "Access Denied"),
        ("SignatureDoesNotMatch", "The request signature we calculated does not match the signature you provided."),
        ("InvalidAccessKeyId", "The AWS Access Key Id you provided does not exist in our records."),
    ],
)
def test_403_is_permission_denied_with_a_credentials_hint(aws_env, code, message):
    with StubHTTPServer(s3_error(403, code, message)) as server, _stub_store(server) as s3:
        calls = {"put": lambda: s3.put("k", b"v"), "get": lambda: s3.get("k"),
                 "head": lambda: s3.head("k"), "list": lambda: s3.list()}
        for op, call in calls.items():
            with pytest.raises(PermissionDenied) as denied:
                call()
            text = str(denied.value)
            assert op in text and "s3://bkt/pre" in text and "credentials" in text
            assert SECRET not in text and SECRET not in str(denied.value.__cause__)
            assert isinstance(denied.value, PermissionError)
    assert len(server.requests) == 4


@pytest.mark.parametrize(
    "status, code",
    [(503, "SlowDown"), (503, "ServiceUnavailable"), (500, "InternalError"), (429, "TooManyRequests"),
     (409, "ConditionalRequestConflict")],
)
def test_server_side_trouble_is_transient_and_not_retried_by_botocore(aws_env, status, code):
    with (StubHTTPServer(s3_error(status, code, "try again")) as server, _stub_store(server) as s3,
          pytest.raises(TransientError, match=rf"put s3://bkt/pre/k.*{code}")):
        s3.put("k", b"v", mode="create")
    assert len(server.requests) == 1


def test_body_cut_short_is_transient(aws_env):
    cut = CannedResponse(200, b"x" * 1000, {"Content-Type": "application/octet-stream"}, send_bytes=100)
    with (StubHTTPServer(cut) as server, _stub_store(server) as s3,
          pytest.raises(TransientError, match="get s3://bkt/pre/k")):
        s3.get("k")


def test_per_key_delete_errors_raise(aws_env):
    body = (b'<?xml version="1.0" encoding="UTF-8"?><DeleteResult>'
            b"<Error><Key>pre/a</Key><Code>NoSuchKey</Code><Message>gone</Message></Error>"
            b"<Error><Key>pre/b</Key><Code>AccessDenied</Code><Message>Access Denied</Message></Error>"
            b"</DeleteResult>")
    with (StubHTTPServer(CannedResponse(200, body, {"Content-Type": "application/xml"})) as server,
          _stub_store(server) as s3, pytest.raises(PermissionDenied, match="s3://bkt/pre/b")):
        s3.delete(["a", "b"])


def test_unreachable_endpoint_is_transient(aws_env):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with (S3Storage("bkt", endpoint_url=f"http://127.0.0.1:{port}", region="us-east-1") as s3,
          pytest.raises(TransientError, match="get s3://bkt/k") as excinfo):
        s3.get("k")
    assert isinstance(excinfo.value.__cause__, EndpointConnectionError)


def _client_error(status: int, code: str) -> ClientError:
    return ClientError({"Error": {"Code": code, "Message": "m"}, "ResponseMetadata": {"HTTPStatusCode": status}},
                       "PutObject")


@pytest.mark.parametrize(
    "exc, mode, expected",
    [
        (_client_error(412, "PreconditionFailed"), "create", AlreadyExists),
        (_client_error(412, "PreconditionFailed"), IfMatch('"e"'), PreconditionFailed),
        (_client_error(404, "NoSuchKey"), IfMatch('"e"'), PreconditionFailed),
        (_client_error(404, "NoSuchKey"), None, NotFound),
        (_client_error(404, "NoSuchUpload"), None, NotFound),
        (_client_error(403, "ExpiredToken"), None, PermissionDenied),
        (_client_error(504, "GatewayTimeout"), None, TransientError),
        (_client_error(400, "InvalidArgument"), None, CloudCkptError),
        (ReadTimeoutError(endpoint_url="http://x"), None, TransientError),
        (FlexibleChecksumError(error_msg="CRC32C mismatch"), None, TransientError),
        (NoCredentialsError(), None, PermissionDenied),
    ],
)
def test_translate_error_table(exc, mode, expected):
    error = translate_error(exc, "put", "bkt", "pre/k", mode)
    assert type(error) is expected
    assert "put s3://bkt/pre/k" in str(error)


def test_constructor_validates_its_arguments(aws_env):
    with pytest.raises(ValueError, match="part_size"):
        S3Storage("b", part_size=MiB)
    with pytest.raises(ValueError, match="bucket"):
        S3Storage("")
    with pytest.raises(ValueError, match="put mode"):
        S3Storage("b", region="us-east-1").put("k", b"", mode="sometimes")
