"""Amazon S3 (and S3-compatible stores) through boto3.

* Conditional writes are S3's own: ``create`` sends ``If-None-Match: *`` and
  ``IfMatch(etag)`` sends ``If-Match``, on PutObject and on
  CompleteMultipartUpload, so the store decides atomically.
* Every upload carries a precomputed CRC32C that S3 checks before it stores
  the bytes; multipart uploads ask for a full-object CRC32C.
* Tokens are ETags exactly as S3 returns them, quotes included.
* botocore's own retries are off (one attempt per call): transient failures
  surface as :class:`~cloudckpt.errors.TransientError` for
  :class:`~cloudckpt.storage.retry.RetryingStorage` to retry.
* Every SDK error is translated by :func:`translate_error` into the cloudckpt
  error tree, naming the operation, the object and what to do.
"""

from __future__ import annotations

import builtins
import contextlib
import http.client
import logging
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import urllib3
from boto3.s3.transfer import TransferConfig
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
)

from ..errors import (
    CloudCkptError,
    CorruptCheckpoint,
    NotFound,
    TransientError,
)
from ..hashing import crc32c_b64, crc32c_b64_from_hex, crc32c_hex_from_b64
from .base import (
    Buffer,
    IfMatch,
    MultipartUpload,
    ObjectInfo,
    PendingUpload,
    PutMode,
    Storage,
    check_key,
    check_prefix,
    check_range,
    check_size,
)
from .endpoints import s3_endpoint
from .lifecycle import EXPIRED_TAG_KEY, EXPIRED_TAG_VALUE
from .s3_checksums import full_object_crc32c, reported_crc32c
from .s3_body import body_of, read_body_into
from .s3_client import make_client
from .s3_errors import Call, error_for_code, precondition_error, translate_error

__all__ = ["S3Storage", "translate_error"]

log = logging.getLogger(__name__)

MiB = 1024 * 1024
GiB = 1024 * MiB
MIN_PART_SIZE = 5 * MiB
MAX_PART_SIZE = 5 * GiB
MAX_PARTS = 10_000
DELETE_BATCH = 1000

def _condition_args(mode: PutMode) -> dict[str, str]:
    """The request parameters that make S3 enforce ``mode``."""
    if mode == "overwrite":
        return {}
    if mode == "create":
        return {"IfNoneMatch": "*"}
    if isinstance(mode, IfMatch):
        return {"IfMatch": mode.token}
    raise ValueError(f"unknown put mode {mode!r}; use 'overwrite', 'create' or IfMatch(token)")


# -- the store -----------------------------------------------------------------
class S3Storage(Storage):
    """Objects under ``s3://bucket/prefix/``; one thread-safe boto3 client, reused by every call.

    Credentials come from the standard chain (environment, ``profile``, the
    instance or pod role).  ``endpoint_url`` points at an S3-compatible store
    (MinIO, moto, R2, ...).  Pass ``client`` to use a ready boto3 S3 client
    instead (its own retry and timeout settings then apply, and closing it is
    left to the caller).
    """

    min_part_size = MIN_PART_SIZE
    supports_conditional_writes = True
    reads_check_size = True
    #: Larger sources are copied part by part (CopyObject's own limit is 5 GiB).
    max_copy_object_size = 5 * GiB

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        *,
        endpoint_url: str | None = None,
        region: str | None = None,
        profile: str | None = None,
        part_size: int = 8 * MiB,
        max_pool_connections: int = 64,
        client: Any = None,
    ) -> None:
        if not bucket or "/" in bucket:
            raise ValueError(f"invalid S3 bucket name {bucket!r}")
        if not MIN_PART_SIZE <= part_size <= MAX_PART_SIZE:
            raise ValueError(f"part_size must be between 5 MiB and 5 GiB, got {part_size}")
        prefix = prefix.strip("/")
        if prefix:
            check_key(prefix)
        self.bucket = bucket
        self.prefix = prefix
        self.url = f"s3://{bucket}/{prefix}"
        self.default_part_size = part_size
        self._root = f"{prefix}/" if prefix else ""
        self._owns_client = client is None
        if client is None:
            with self._translated("connect to", None):
                client = make_client(endpoint_url, region, profile, max_pool_connections)
        self._client = client
        self.endpoint, self.endpoint_setting = s3_endpoint(client, endpoint_url, region, self._owns_client)

    # -- helpers ---------------------------------------------------------------
    def _full(self, key: str) -> str:
        return self._root + check_key(key)

    @contextlib.contextmanager
    def _translated(self, op: str, full_key: str | None, mode: PutMode | None = None) -> Iterator[None]:
        """Re-raise SDK errors from the block as cloudckpt errors, chained to the original."""
        try:
            yield
        except (ClientError, BotoCoreError, urllib3.exceptions.HTTPError) as exc:
            raise translate_error(exc, op, self.bucket, full_key, mode,
                                  (getattr(self, "endpoint", None), getattr(self, "endpoint_setting", None))) from exc

    # -- Storage ---------------------------------------------------------------
    def put(self, key: str, data: Buffer, mode: PutMode = "overwrite", *, crc32c: str | None = None) -> ObjectInfo:
        """Store ``data`` with S3 checking its CRC32C (``crc32c``, hex, if the caller has it; computed
        otherwise); ``mode`` is enforced by S3 itself."""
        full = self._full(key)
        conditions = _condition_args(mode)
        size = memoryview(data).nbytes
        crc = crc32c_b64_from_hex(crc32c) if crc32c is not None else crc32c_b64(data)
        with self._translated("put", full, mode):
            response = self._client.put_object(
                Bucket=self.bucket, Key=full, Body=body_of(data),
                ChecksumAlgorithm="CRC32C", ChecksumCRC32C=crc, **conditions,
            )
        return ObjectInfo(key=key, size=size, token=response["ETag"], crc32c=reported_crc32c(self.url, response))

    def get(self, key: str, range: tuple[int, int] | None = None) -> bytes:
        """Return the object, or bytes ``[start, end)`` of it (fewer if it ends sooner)."""
        full = self._full(key)
        check_range(key, range)
        if range is not None and range[0] == range[1]:
            return b""
        extra = {"Range": f"bytes={range[0]}-{range[1] - 1}"} if range else {}
        with self._translated("get", full):
            try:
                response = self._client.get_object(Bucket=self.bucket, Key=full, **extra)
            except ClientError as exc:
                if range and _is_unsatisfiable_range(exc):
                    return b""
                raise
            with contextlib.closing(response["Body"]) as body:
                return body.read()

    def get_with_token(self, key: str) -> tuple[bytes, str]:
        """The object and its ETag, from one GET."""
        full = self._full(key)
        with self._translated("get", full):
            response = self._client.get_object(Bucket=self.bucket, Key=full)
            with contextlib.closing(response["Body"]) as body:
                return body.read(), response["ETag"]

    def read_into(self, key: str, buffer: memoryview, offset: int = 0, *, size: int | None = None) -> int:
        """Read bytes ``[offset, offset + len(buffer))`` with one ranged GET straight into ``buffer``
        (checking ``size`` against the object size in the answer's Content-Range)."""
        target = memoryview(buffer).cast("B")
        if not len(target):
            return 0
        full = self._full(key)
        with self._translated("get", full):
            try:
                response = self._client.get_object(
                    Bucket=self.bucket, Key=full, Range=f"bytes={offset}-{offset + len(target) - 1}")
            except ClientError as exc:
                if _is_unsatisfiable_range(exc):
                    return 0
                raise
            with contextlib.closing(response["Body"]) as body:
                answered = response.get("ContentRange")
                if offset if answered is None else not answered.startswith(f"bytes {offset}-"):
                    raise CorruptCheckpoint(f"s3://{self.bucket}/{full}: asked for bytes from {offset}, the store "
                                            f"answered with {response.get('ContentRange')!r}")
                if size is not None:
                    total = answered.rpartition("/")[2] if answered else str(response.get("ContentLength"))
                    check_size(f"s3://{self.bucket}", full, int(total) if total.isdigit() else -1, size)
                try:
                    filled = read_body_into(body, target)
                except (OSError, http.client.HTTPException) as exc:
                    raise TransientError(f"s3://{self.bucket}/{full}: reading bytes from {offset} failed ({exc}); "
                                         "retry") from exc
                announced = response.get("ContentLength")
                if isinstance(announced, int) and filled < min(announced, len(target)):
                    # the connection closed before the announced length (http.client does not raise)
                    raise TransientError(f"s3://{self.bucket}/{full}: the answer for bytes from {offset} ended after "
                                         f"{filled} of {announced} bytes; retry")
                return filled

    def head(self, key: str) -> ObjectInfo:
        """The object's size, ETag, modification time and (when S3 has one) full-object CRC32C."""
        full = self._full(key)
        with self._translated("head", full):
            response = self._client.head_object(Bucket=self.bucket, Key=full, ChecksumMode="ENABLED")
        return ObjectInfo(
            key=key,
            size=response["ContentLength"],
            token=response["ETag"],
            last_modified=response.get("LastModified"),
            crc32c=full_object_crc32c(response),
        )

    def list(self, prefix: str = "", *, recursive: bool = True) -> list[ObjectInfo]:
        """Every object under ``prefix`` (all pages of ListObjectsV2), sorted by key."""
        check_prefix(prefix)
        infos: list[ObjectInfo] = []
        with self._translated("list", self._root + prefix):
            pages = self._client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=self._root + prefix, **({} if recursive else {"Delimiter": "/"})
            )
            for page in pages:
                infos.extend(
                    ObjectInfo(
                        key=item["Key"][len(self._root):],
                        size=item["Size"],
                        token=item["ETag"],
                        last_modified=item.get("LastModified"),
                    )
                    for item in page.get("Contents", [])
                )
        return sorted(infos, key=lambda info: info.key)

    def delete(self, keys: Iterable[str]) -> None:
        """Delete ``keys`` with DeleteObjects, 1000 per request; missing keys are ignored."""
        full_keys = [self._full(key) for key in keys]
        for start in range(0, len(full_keys), DELETE_BATCH):
            self._delete_batch(full_keys[start:start + DELETE_BATCH])

    def _delete_batch(self, full_keys: builtins.list[str]) -> None:
        with self._translated(f"delete of {len(full_keys)} keys under", self._root):
            response = self._client.delete_objects(
                Bucket=self.bucket,
                Delete={"Objects": [{"Key": key} for key in full_keys], "Quiet": True},
            )
        errors = [e for e in response.get("Errors", []) if e.get("Code") != "NoSuchKey"]
        if errors:
            first = errors[0]
            more = f" (and {len(errors) - 1} more keys failed)" if len(errors) > 1 else ""
            error = error_for_code(
                str(first.get("Code", "")), None, str(first.get("Message", "")) + more,
                Call("delete", self.bucket, first.get("Key")),
            )
            raise error

    def copy(self, src: str, dst: str) -> ObjectInfo:
        """Copy server-side (CopyObject, or a multipart copy for sources over 5 GiB)."""
        source = self.head(src)
        full_src, full_dst = self._full(src), self._full(dst)
        copy_source = {"Bucket": self.bucket, "Key": full_src}
        with self._translated(f"copy of s3://{self.bucket}/{full_src} to", full_dst):
            if source.size > self.max_copy_object_size:
                return self._managed_copy(copy_source, dst, full_dst)
            response = self._client.copy_object(
                Bucket=self.bucket, Key=full_dst, CopySource=copy_source, ChecksumAlgorithm="CRC32C"
            )
        result = response["CopyObjectResult"]
        return ObjectInfo(
            key=dst,
            size=source.size,
            token=result["ETag"],
            last_modified=result.get("LastModified"),
            crc32c=source.crc32c,
        )

    def _managed_copy(self, copy_source: dict[str, str], dst: str, full_dst: str) -> ObjectInfo:
        config = TransferConfig(
            multipart_threshold=self.max_copy_object_size,
            multipart_chunksize=self.default_part_size,
            max_concurrency=8,
        )
        self._client.copy(copy_source, self.bucket, full_dst,
                          ExtraArgs={"ChecksumAlgorithm": "CRC32C"}, Config=config)
        return self.head(dst)

    def multipart(self, key: str, mode: PutMode = "overwrite") -> MultipartUpload:
        """Start a multipart upload with full-object CRC32C; ``mode`` is enforced on complete."""
        full = self._full(key)
        _condition_args(mode)
        with self._translated("start multipart upload of", full):
            response = self._client.create_multipart_upload(
                Bucket=self.bucket, Key=full, ChecksumAlgorithm="CRC32C", ChecksumType="FULL_OBJECT"
            )
        log.debug("started multipart upload %s of %s", response["UploadId"], full)
        return _S3Upload(self, key, full, mode, response["UploadId"])

    def mark_expired(self, keys: Iterable[str]) -> None:
        """Tag each object ``cloudckpt-expired=true`` for a lifecycle rule; missing keys are skipped."""
        tagging = {"TagSet": [{"Key": EXPIRED_TAG_KEY, "Value": EXPIRED_TAG_VALUE}]}
        for key in keys:
            full = self._full(key)
            try:
                with self._translated("tag as expired", full):
                    self._client.put_object_tagging(Bucket=self.bucket, Key=full, Tagging=tagging)
            except NotFound:
                log.debug("mark_expired: %s is already gone", full)

    def list_pending_uploads(self, prefix: str = "") -> builtins.list[PendingUpload]:
        """Multipart uploads under ``prefix`` never completed or aborted (all pages), sorted."""
        check_prefix(prefix)
        pending: list[PendingUpload] = []
        with self._translated("list multipart uploads under", self._root + prefix):
            pages = self._client.get_paginator("list_multipart_uploads").paginate(
                Bucket=self.bucket, Prefix=self._root + prefix
            )
            for page in pages:
                pending.extend(
                    PendingUpload(item["Key"][len(self._root):], item["UploadId"], item.get("Initiated"))
                    for item in page.get("Uploads", [])
                )
        return sorted(pending, key=lambda p: (p.key, p.upload_id))

    def abort_pending_upload(self, pending: PendingUpload) -> None:
        """Abort one upload found by :meth:`list_pending_uploads`; already gone is fine."""
        self._abort(self._full(pending.key), pending.upload_id)

    def _abort(self, full_key: str, upload_id: str) -> None:
        try:
            with self._translated("abort multipart upload of", full_key):
                self._client.abort_multipart_upload(Bucket=self.bucket, Key=full_key, UploadId=upload_id)
        except NotFound:
            log.debug("multipart upload %s of %s was already gone", upload_id, full_key)

    def close(self) -> None:
        """Close the connection pool of the client this store created."""
        if self._owns_client:
            self._client.close()


def _is_unsatisfiable_range(exc: ClientError) -> bool:
    """Whether S3 refused a range because it starts at or past the end of the object (HTTP 416)."""
    return (
        exc.response.get("Error", {}).get("Code") == "InvalidRange"
        or exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") == 416
    )


@dataclass(frozen=True)
class _Part:
    etag: str
    crc32c: str
    size: int


class _S3Upload(MultipartUpload):
    """One S3 multipart upload; parts may be sent from many threads at once."""

    def __init__(self, store: S3Storage, key: str, full_key: str, mode: PutMode, upload_id: str) -> None:
        self.key = key
        self._store = store
        self._full = full_key
        self._mode = mode
        self._upload_id = upload_id
        self._parts: dict[int, _Part] = {}
        self._lock = threading.Lock()

    def upload_part(self, number: int, data: Buffer, *, crc32c: str | None = None) -> None:
        """Send part ``number`` with its CRC32C (``crc32c``, hex, if the caller has it), which S3 verifies."""
        if not 1 <= number <= MAX_PARTS:
            raise ValueError(f"part numbers run from 1 to {MAX_PARTS}, got {number}")
        crc = crc32c_b64_from_hex(crc32c) if crc32c is not None else crc32c_b64(data)
        with self._store._translated(f"upload part {number} of", self._full):
            response = self._store._client.upload_part(
                Bucket=self._store.bucket, Key=self._full, UploadId=self._upload_id, PartNumber=number,
                Body=body_of(data), ChecksumAlgorithm="CRC32C", ChecksumCRC32C=crc,
            )
        reported = response.get("ChecksumCRC32C")
        if reported is not None and reported != crc:
            raise CorruptCheckpoint(
                f"{self._store.url}/{self.key}: S3 reports CRC32C {crc32c_hex_from_b64(reported)} for part "
                f"{number}, but {crc32c_hex_from_b64(crc)} was sent")
        with self._lock:
            self._parts[number] = _Part(response["ETag"], crc, memoryview(data).nbytes)

    def complete(self) -> ObjectInfo:
        """Assemble the parts, with S3 enforcing the mode; any non-transient failure aborts the upload.

        A TransientError leaves the upload open so that ``complete`` can be
        retried; the caller aborts it if it gives up.
        """
        try:
            return self._complete()
        except TransientError:
            raise
        except BaseException:
            self._abort_after_failure()
            raise

    def _abort_after_failure(self) -> None:
        try:
            self.abort()
        except CloudCkptError as exc:
            log.warning("could not abort multipart upload %s of %s after a failed complete "
                        "(a bucket rule for incomplete uploads will remove it): %s",
                        self._upload_id, self._full, exc)

    def _complete(self) -> ObjectInfo:
        if not self._parts:
            self.upload_part(1, b"")
        with self._lock:
            parts = sorted(self._parts.items())
        numbers = [number for number, _ in parts]
        if numbers != list(range(1, len(numbers) + 1)):
            raise ValueError(f"multipart upload of {self.key!r} has gaps in its parts: {numbers}")
        self._check_if_match()
        with self._store._translated("complete multipart upload of", self._full, self._mode):
            response = self._store._client.complete_multipart_upload(
                Bucket=self._store.bucket, Key=self._full, UploadId=self._upload_id,
                MultipartUpload={"Parts": [
                    {"PartNumber": number, "ETag": part.etag, "ChecksumCRC32C": part.crc32c}
                    for number, part in parts
                ]},
                **_condition_args(self._mode),
            )
        log.debug("completed multipart upload %s of %s", self._upload_id, self._full)
        crc = full_object_crc32c(response)
        if crc is None:  # not every store reports it on completion (moto does not): ask for it
            with self._store._translated("head", self._full):
                response = {**self._store._client.head_object(
                    Bucket=self._store.bucket, Key=self._full, ChecksumMode="ENABLED"), "ETag": response["ETag"]}
            crc = reported_crc32c(self._store.url, response)
        return ObjectInfo(
            key=self.key,
            size=sum(part.size for _, part in parts),
            token=response["ETag"],
            crc32c=crc,
        )

    def _check_if_match(self) -> None:
        """Refuse early, with a HEAD, an IfMatch completion whose token is already stale.

        S3 enforces If-Match on CompleteMultipartUpload atomically; some
        S3-compatible stores (moto among them) ignore it there, and this check
        is then the only (non-atomic) protection.
        """
        if not isinstance(self._mode, IfMatch):
            return
        try:
            current = self._store.head(self.key).token
        except NotFound:
            current = None
        if current is None or current.strip('"') != self._mode.token.strip('"'):
            raise precondition_error(
                Call("complete multipart upload of", self._store.bucket, self._full, self._mode),
                "(the object is missing)" if current is None else f"(its ETag is now {current})",
            )

    def abort(self) -> None:
        """Abort the upload so its parts stop being billed; safe to call twice."""
        self._store._abort(self._full, self._upload_id)
