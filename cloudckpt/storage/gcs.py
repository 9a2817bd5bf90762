"""Google Cloud Storage through google-cloud-storage's JSON API.

* Conditional writes use generations: ``create`` sends ``ifGenerationMatch=0``
  and ``IfMatch(token)`` sends ``ifGenerationMatch=token``; tokens are
  generations as decimal strings.
* Objects up to ``resumable_threshold`` go in one multipart/related request;
  larger ones use a resumable upload in ``chunk_size`` chunks.  Every upload
  carries a CRC32C that GCS checks before it stores the bytes, and full
  downloads are checked against the object's CRC32C.
* This SDK has no S3-style multipart upload, so :meth:`GCSStorage.multipart`
  stores each part as a temporary object under the hidden
  ``.cloudckpt/uploads/`` prefix and ``complete`` composes them (a tree of
  composes when there are more than 32) into the destination, with the
  destination's generation precondition.  Listings never show those objects.
* The SDK's own retries are off (``retry=None`` on every call): transient
  failures surface as :class:`~cloudckpt.errors.TransientError` for
  :class:`~cloudckpt.storage.retry.RetryingStorage` to retry.
* Every SDK error is translated by :func:`translate_error` into the cloudckpt
  error tree, naming the operation, the bucket and the object.
"""

from __future__ import annotations

import builtins
import contextlib
import datetime as _dt
import io
import logging
import os
import threading
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Iterable, Iterator, Sequence, TypeVar

import requests
from google.api_core import exceptions as api_exceptions
from google.auth.credentials import AnonymousCredentials, Credentials
from google.cloud import storage

from ..errors import CloudCkptError, InvalidKey, NotFound, PreconditionFailed, TransientError
from ..hashing import crc32c_hex_from_b64
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
)
from .endpoints import gcs_endpoint
from .lifecycle import GCS_EXPIRED_FIELD as EXPIRED_CUSTOM_TIME_FIELD
from .gcs_errors import SDK_ERRORS, refusal, translate_error
from .sdk_rng import isolate_sdk_random

__all__ = ["EXPIRED_CUSTOM_TIME_FIELD", "GCSStorage", "translate_error"]

log = logging.getLogger(__name__)
T = TypeVar("T")

isolate_sdk_random()

KiB = 1024
MiB = 1024 * KiB
#: Resumable chunks must be multiples of this (a GCS rule).
CHUNK_ALIGNMENT = 256 * KiB
#: The SDK sends every upload of known size above this resumably; it cannot go higher.
SDK_SIMPLE_UPLOAD_MAX = 8 * MiB
#: Most sources one compose request accepts.
COMPOSE_MAX_SOURCES = 32
LIST_PAGE_SIZE = 1000
#: Threads for deletes, lifecycle marks and intermediate composes.
FAN_OUT = 16
HTTP_POOL_SIZE = 32
CONNECT_TIMEOUT_S = 10.0
READ_TIMEOUT_S = 120.0
#: Hidden key prefix (under the store prefix) that holds the parts of multipart uploads.
UPLOADS_PREFIX = ".cloudckpt/uploads/"
_CONTENT_TYPE = "application/octet-stream"

# -- helpers -------------------------------------------------------------------
def _generation_condition(mode: PutMode) -> int | None:
    """The ``if_generation_match`` value that makes GCS enforce ``mode``."""
    if mode == "overwrite":
        return None
    if mode == "create":
        return 0
    if isinstance(mode, IfMatch):
        if not (mode.token.isascii() and mode.token.isdigit()):
            raise PreconditionFailed(
                f"IfMatch token {mode.token!r} is not a GCS generation, so no object can match it"
            )
        return int(mode.token)
    raise ValueError(f"unknown put mode {mode!r}; use 'overwrite', 'create' or IfMatch(token)")


def _object_info(key: str, blob: storage.Blob) -> ObjectInfo:
    return ObjectInfo(
        key=key,
        size=int(blob.size or 0),
        token=str(blob.generation),
        last_modified=blob.updated,
        crc32c=crc32c_hex_from_b64(blob.crc32c) if blob.crc32c else None,
    )


def _fan_out(fn: Callable[[T], Any], items: Iterable[T]) -> None:
    """Call ``fn`` on every item from a bounded thread pool; re-raise the first failure."""
    items = list(items)
    if not items:
        return
    with ThreadPoolExecutor(max_workers=min(FAN_OUT, len(items))) as pool:
        for _ in pool.map(fn, items):
            pass


def _make_client(project: str | None, endpoint_url: str | None,
                 credentials: Credentials | None) -> storage.Client:
    """A client for GCS, an emulator (STORAGE_EMULATOR_HOST) or ``endpoint_url``.

    Against an emulator or an explicit endpoint, anonymous credentials are used
    unless ``credentials`` are given, so no Application Default Credentials
    lookup happens; otherwise the SDK finds ADC.  ``project`` may stay None:
    object operations do not need one, and then none is looked up either.
    """
    if credentials is None and (endpoint_url or os.environ.get("STORAGE_EMULATOR_HOST")):
        credentials = AnonymousCredentials()
    options = {"api_endpoint": endpoint_url} if endpoint_url else None
    client = storage.Client(project=project, credentials=credentials, client_options=options)
    session = client._http  # google-cloud-core's lazily built AuthorizedSession
    if not getattr(session, "is_mtls", False):  # keep an mTLS adapter the session configured
        adapter = requests.adapters.HTTPAdapter(pool_maxsize=HTTP_POOL_SIZE)
        session.mount("https://", adapter)
        session.mount("http://", adapter)
    return client


# -- the store -----------------------------------------------------------------
class GCSStorage(Storage):
    """Objects under ``gs://bucket/prefix/``; one ``storage.Client`` shared by every thread.

    The client's requests session serves concurrent independent requests
    (the SDK's transfer_manager shares one the same way); its connection pool
    is sized for :data:`HTTP_POOL_SIZE` threads.  Credentials are Application
    Default Credentials unless ``credentials`` is given; with
    STORAGE_EMULATOR_HOST set or ``endpoint_url`` given they are anonymous.
    Pass ``client`` to use a ready client instead; the store then leaves
    closing it to the caller.  ``timeout`` is (connect, read) seconds per request.
    """

    min_part_size = 1
    supports_conditional_writes = True

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        *,
        project: str | None = None,
        endpoint_url: str | None = None,
        credentials: Credentials | None = None,
        resumable_threshold: int = 8 * MiB,
        chunk_size: int = 16 * MiB,
        timeout: float | tuple[float, float] = (CONNECT_TIMEOUT_S, READ_TIMEOUT_S),
        client: storage.Client | None = None,
    ) -> None:
        if not bucket or "/" in bucket:
            raise ValueError(f"invalid GCS bucket name {bucket!r}")
        if chunk_size <= 0 or chunk_size % CHUNK_ALIGNMENT:
            raise ValueError(f"chunk_size must be a positive multiple of 256 KiB, got {chunk_size}")
        if not 0 <= resumable_threshold <= SDK_SIMPLE_UPLOAD_MAX:
            raise ValueError(
                f"resumable_threshold must be between 0 and 8 MiB (the SDK uploads anything "
                f"larger resumably), got {resumable_threshold}"
            )
        prefix = prefix.strip("/")
        if prefix:
            check_key(prefix)
        self.bucket = bucket
        self.prefix = prefix
        self.url = f"gs://{bucket}/{prefix}"
        self._root = f"{prefix}/" if prefix else ""
        self._uploads_root = self._root + UPLOADS_PREFIX
        self._resumable_threshold = resumable_threshold
        self._chunk_size = chunk_size
        self._timeout = timeout
        self._owns_client = client is None
        if client is None:
            with self._translated("connect to", None):
                client = _make_client(project, endpoint_url, credentials)
        self._client = client
        self._bucket = client.bucket(bucket)
        self.endpoint, self.endpoint_setting = gcs_endpoint(client, endpoint_url, self._owns_client)

    # -- helpers ---------------------------------------------------------------
    def _name(self, key: str) -> str:
        """The full object name of a caller's key; the hidden uploads prefix is refused."""
        name = self._root + check_key(key)
        if name.startswith(self._uploads_root):
            raise InvalidKey(f"storage key {key!r} is under {UPLOADS_PREFIX!r}, reserved for multipart parts")
        return name

    @contextlib.contextmanager
    def _translated(self, op: str, name: str | None, mode: PutMode | None = None,
                    *, missing_bucket: bool = False) -> Iterator[None]:
        """Re-raise SDK errors from the block as cloudckpt errors, chained to the original."""
        try:
            yield
        except SDK_ERRORS as exc:
            raise translate_error(exc, op, self.bucket, name, mode, missing_bucket=missing_bucket,
                                  endpoint=(getattr(self, "endpoint", None), getattr(self, "endpoint_setting", None))
                                  ) from exc

    def _upload(self, name: str, data: Buffer, mode: PutMode) -> storage.Blob:
        """Upload simply or resumably by size, with CRC32C, enforcing ``mode``.

        fake-gcs-server checks generation preconditions on simple uploads
        only; GCS checks them on both.
        """
        condition = _generation_condition(mode)
        view = memoryview(data).cast("B")
        resumable = len(view) > self._resumable_threshold
        blob = self._bucket.blob(name, chunk_size=self._chunk_size if resumable else None)
        # The SDK picks a simple upload for known sizes up to 8 MiB; an unknown size forces resumable.
        size = None if resumable and len(view) <= SDK_SIMPLE_UPLOAD_MAX else len(view)
        blob.upload_from_file(
            io.BytesIO(data if isinstance(data, bytes) else view), size=size,
            content_type=_CONTENT_TYPE, if_generation_match=condition,
            checksum="crc32c", retry=None, timeout=self._timeout,
        )
        return blob

    def _list_blobs(self, prefix: str, delimiter: str | None = None) -> list[storage.Blob]:
        """Every object whose full name starts with ``prefix``, all pages."""
        with self._translated("list", prefix, missing_bucket=True):
            return list(self._client.list_blobs(
                self._bucket, prefix=prefix, delimiter=delimiter, page_size=LIST_PAGE_SIZE,
                retry=None, timeout=self._timeout,
            ))

    def _delete_name(self, name: str) -> None:
        try:
            with self._translated("delete", name):
                self._bucket.delete_blob(name, retry=None, timeout=self._timeout)
        except NotFound:
            log.debug("delete: %s is already gone", name)

    # -- Storage ---------------------------------------------------------------
    def put(self, key: str, data: Buffer, mode: PutMode = "overwrite") -> ObjectInfo:
        """Store ``data`` (simple or resumable upload by size) with GCS checking its CRC32C."""
        name = self._name(key)
        with self._translated("put", name, mode, missing_bucket=True):
            blob = self._upload(name, data, mode)
        return _object_info(key, blob)

    def get(self, key: str, range: tuple[int, int] | None = None) -> bytes:
        """Return the object (CRC32C-checked), or bytes ``[start, end)`` of it (fewer if it ends sooner)."""
        name = self._name(key)
        check_range(key, range)
        if range is not None and range[0] == range[1]:
            self.head(key)
            return b""
        blob = self._bucket.blob(name)
        with self._translated("get", name):
            if range is None:
                return blob.download_as_bytes(checksum="crc32c", retry=None, timeout=self._timeout)
            try:
                return blob.download_as_bytes(start=range[0], end=range[1] - 1, checksum=None,
                                              retry=None, timeout=self._timeout)
            except api_exceptions.RequestRangeNotSatisfiable:
                return b""

    def head(self, key: str) -> ObjectInfo:
        """The object's size, generation, update time and CRC32C."""
        name = self._name(key)
        blob = self._bucket.blob(name)
        with self._translated("head", name):
            blob.reload(retry=None, timeout=self._timeout)
        return _object_info(key, blob)

    def list(self, prefix: str = "", *, recursive: bool = True) -> list[ObjectInfo]:
        """Every object under ``prefix`` (all pages), sorted by key; multipart parts are hidden."""
        check_prefix(prefix)
        infos = [
            _object_info(blob.name[len(self._root):], blob)
            for blob in self._list_blobs(self._root + prefix, delimiter=None if recursive else "/")
            if not blob.name.startswith(self._uploads_root)
        ]
        return sorted(infos, key=lambda info: info.key)

    def delete(self, keys: Iterable[str]) -> None:
        """Delete ``keys`` from a pool of threads; missing keys are ignored.

        Not a JSON batch request: fake-gcs-server has no batch endpoint, and
        this path is the one the tests exercise.
        """
        _fan_out(self._delete_name, [self._name(key) for key in keys])

    def copy(self, src: str, dst: str) -> ObjectInfo:
        """Copy server-side with objects.rewrite (any size, resumed until done)."""
        source = self._bucket.blob(self._name(src))
        target = self._bucket.blob(self._name(dst))
        with self._translated(f"copy of gs://{self.bucket}/{source.name} to", target.name):
            token, _, _ = target.rewrite(source, retry=None, timeout=self._timeout)
            while token is not None:
                token, _, _ = target.rewrite(source, token=token, retry=None, timeout=self._timeout)
        return _object_info(dst, target)

    def multipart(self, key: str, mode: PutMode = "overwrite") -> MultipartUpload:
        """Start a multipart upload: parts become temporary objects, composed on ``complete``."""
        name = self._name(key)
        _generation_condition(mode)
        upload_id = uuid.uuid4().hex
        log.debug("started multipart upload %s of %s", upload_id, name)
        return _GCSUpload(self, key, name, mode, f"{self._uploads_root}{key}/{upload_id}/")

    def mark_expired(self, keys: Iterable[str]) -> None:
        """Set each object's customTime (:data:`EXPIRED_CUSTOM_TIME_FIELD`) to now; missing keys are skipped.

        A bucket lifecycle rule with a ``daysSinceCustomTime`` condition then deletes them.
        """
        now = _dt.datetime.now(_dt.timezone.utc)
        _fan_out(lambda name: self._mark_expired(name, now), [self._name(key) for key in keys])

    def _mark_expired(self, name: str, now: _dt.datetime) -> None:
        blob = self._bucket.blob(name)
        blob.custom_time = now
        try:
            with self._translated("mark expired", name):
                blob.patch(retry=None, timeout=self._timeout)
        except NotFound:
            log.debug("mark_expired: %s is already gone", name)

    def list_pending_uploads(self, prefix: str = "") -> builtins.list[PendingUpload]:
        """Multipart uploads of keys under ``prefix`` whose part objects are still stored.

        ``initiated`` is the creation time of the oldest part.
        """
        check_prefix(prefix)
        started: dict[tuple[str, str], _dt.datetime] = {}
        for blob in self._list_blobs(self._uploads_root + prefix):
            key, upload_id, _ = blob.name[len(self._uploads_root):].rsplit("/", 2)
            when = blob.time_created
            started[key, upload_id] = min(started.get((key, upload_id), when), when)
        return [PendingUpload(key, upload_id, when) for (key, upload_id), when in sorted(started.items())]

    def abort_pending_upload(self, pending: PendingUpload) -> None:
        """Delete the part objects of one upload found by :meth:`list_pending_uploads`."""
        self._delete_group(f"{self._uploads_root}{check_key(pending.key)}/{pending.upload_id}/")

    def _delete_group(self, group: str) -> None:
        """Delete the objects directly in one upload's folder (parts and intermediate composes)."""
        _fan_out(self._delete_name, [blob.name for blob in self._list_blobs(group, delimiter="/")])

    def _compose(self, sources: Sequence[str], name: str, mode: PutMode) -> storage.Blob:
        """Compose up to 32 objects into ``name``; GCS enforces ``mode`` on the destination."""
        target = self._bucket.blob(name)
        target.content_type = _CONTENT_TYPE
        with self._translated("compose", name, mode):
            target.compose([self._bucket.blob(source) for source in sources],
                           if_generation_match=_generation_condition(mode),
                           retry=None, timeout=self._timeout)
        return target

    def _compose_tree(self, sources: Sequence[str], group: str, name: str, mode: PutMode) -> storage.Blob:
        """Compose any number of objects, in order, into ``name`` via intermediates in ``group``."""
        level = 0
        while len(sources) > COMPOSE_MAX_SOURCES:
            level += 1
            batches = [sources[i:i + COMPOSE_MAX_SOURCES] for i in range(0, len(sources), COMPOSE_MAX_SOURCES)]
            targets = [f"{group}compose-{level}-{i:05d}" for i in range(len(batches))]
            _fan_out(lambda pair: self._compose(pair[0], pair[1], "overwrite"), zip(batches, targets))
            sources = targets
        return self._compose(sources, name, mode)

    def close(self) -> None:
        """Close the HTTP session of the client this store created."""
        if self._owns_client:
            self._client.close()


class _GCSUpload(MultipartUpload):
    """Parts as temporary objects in one folder of the hidden uploads prefix; sent from many threads."""

    def __init__(self, store: GCSStorage, key: str, name: str, mode: PutMode, group: str) -> None:
        self.key = key
        self._store = store
        self._name = name
        self._mode = mode
        self._group = group
        self._parts: set[int] = set()
        self._lock = threading.Lock()
        self._finished = False

    def _part_name(self, number: int) -> str:
        return f"{self._group}part-{number:05d}"

    def upload_part(self, number: int, data: Buffer) -> None:
        """Store part ``number`` as a temporary object, CRC32C-checked by GCS."""
        if number < 1:
            raise ValueError(f"part numbers start at 1, got {number}")
        if self._finished:
            raise NotFound(f"{self._store.url}: multipart upload of {self.key!r} was aborted or completed")
        with self._store._translated(f"upload part {number} of", self._name, missing_bucket=True):
            self._store._upload(self._part_name(number), data, "overwrite")
        with self._lock:
            self._parts.add(number)

    def complete(self) -> ObjectInfo:
        """Compose the parts into the object, then delete them.

        A non-transient failure aborts the upload; a TransientError leaves it
        open so that ``complete`` can be retried.
        """
        try:
            info = self._complete()
        except TransientError:
            raise
        except BaseException:
            self.abort()
            raise
        self._finished = True
        self._delete_parts()
        log.debug("completed multipart upload %s", self._group)
        return info

    def _complete(self) -> ObjectInfo:
        with self._lock:
            numbers = sorted(self._parts)
        if not numbers:
            return self._store.put(self.key, b"", self._mode)
        if numbers != list(range(1, len(numbers) + 1)):
            raise ValueError(f"multipart upload of {self.key!r} has gaps in its parts: {numbers}")
        self._check_destination()
        sources = [self._part_name(number) for number in numbers]
        return _object_info(self.key, self._store._compose_tree(sources, self._group, self._name, self._mode))

    def _check_destination(self) -> None:
        """Refuse early, with a GET of the metadata, a completion that ``mode`` forbids.

        GCS enforces the generation precondition on compose atomically;
        fake-gcs-server ignores it there, and this check is then the only
        (non-atomic) protection.  It also spares the composes of a doomed upload.
        """
        if self._mode == "overwrite":
            return
        try:
            current: str | None = self._store.head(self.key).token
        except NotFound:
            current = None
        expected = self._mode.token if isinstance(self._mode, IfMatch) else None
        if current != expected:
            raise refusal(f"complete multipart upload of gs://{self._store.bucket}/{self._name}",
                           self._mode, f"(current generation {current})")

    def _delete_parts(self) -> None:
        try:
            self._store._delete_group(self._group)
        except CloudCkptError as exc:
            log.warning("multipart upload %s completed, but deleting its parts failed (%s); "
                        "list_pending_uploads() finds them", self._group, exc)

    def abort(self) -> None:
        """Delete every part and intermediate object; safe to call twice."""
        self._finished = True
        self._store._delete_group(self._group)
