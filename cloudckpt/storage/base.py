"""The Storage protocol: bytes in, bytes out, with the conditional writes commits rely on.

A backend implements about eight verbs.  All are synchronous and thread-safe;
parallelism lives in a bounded pool above them (see :func:`upload_multipart`).

Write modes
    ``"overwrite"``   replace whatever is there.
    ``"create"``      fail with :class:`~cloudckpt.errors.AlreadyExists` if the key exists.
    ``IfMatch(token)`` fail with :class:`~cloudckpt.errors.PreconditionFailed` unless the
                      object's current ``ObjectInfo.token`` equals ``token``.
"""

from __future__ import annotations

import abc
import datetime as _dt
import functools
import inspect
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterable, Literal, Union

from ..errors import CorruptCheckpoint, InvalidKey

if TYPE_CHECKING:
    from .capabilities import Capabilities

Buffer = Union[bytes, bytearray, memoryview]


@dataclass(frozen=True)
class IfMatch:
    """Write only if the object still carries ``token`` (an S3 ETag or a GCS generation)."""

    token: str


PutMode = Union[Literal["overwrite", "create"], IfMatch]


@dataclass(frozen=True)
class ObjectInfo:
    """What a store knows about one object.

    ``token`` is the value to pass to :class:`IfMatch` for a compare-and-swap.
    ``crc32c`` is the CRC32C (hex) of the whole object *as the store itself reports it* (S3's
    ``ChecksumCRC32C``, GCS's ``crc32c``), never one computed by the client; None when the store
    reports none.  Writers compare it with what they sent.
    """

    key: str
    size: int
    token: str
    last_modified: _dt.datetime | None = None
    crc32c: str | None = None


@dataclass(frozen=True)
class PendingUpload:
    """A multipart upload that was started and neither completed nor aborted."""

    key: str
    upload_id: str
    initiated: _dt.datetime | None


def check_key(key: str) -> str:
    """Return ``key`` if it is a safe relative key, else raise :class:`InvalidKey`."""
    if not isinstance(key, str) or not key:
        raise InvalidKey(f"storage key must be a non-empty string, got {key!r}")
    if key.startswith("/") or key.startswith("\\") or (len(key) > 1 and key[1] == ":"):
        raise InvalidKey(f"storage key {key!r} is absolute; keys are relative to the store root")
    if "\\" in key or "\x00" in key:
        raise InvalidKey(f"storage key {key!r} contains a backslash or NUL byte")
    for segment in key.split("/"):
        if segment in ("", ".", ".."):
            raise InvalidKey(
                f"storage key {key!r} has an empty, '.' or '..' segment; "
                "use plain names joined by single '/'"
            )
    return key


def check_prefix(prefix: str) -> str:
    """Validate a listing prefix: empty, or a key that may end with ``/``."""
    if prefix == "":
        return prefix
    check_key(prefix[:-1] if prefix.endswith("/") else prefix)
    return prefix


def is_direct_child(key: str, prefix: str) -> bool:
    """Whether ``key`` lies directly under ``prefix`` (no further ``/``)."""
    return key.startswith(prefix) and "/" not in key[len(prefix):]


def check_size(url: str, key: str, actual: int, expected: int | None) -> None:
    """For ``read_into(..., size=expected)``: the object must have the size its reader expects."""
    if expected is not None and actual != expected:
        raise CorruptCheckpoint(f"{url}/{key}: the object has {actual} bytes, {expected} were expected")


def check_range(key: str, byte_range: tuple[int, int] | None) -> None:
    if byte_range is None:
        return
    start, end = byte_range
    if not (isinstance(start, int) and isinstance(end, int)) or start < 0 or end < start:
        raise ValueError(
            f"invalid byte range {byte_range!r} for {key!r}: expected (start, end) "
            "with 0 <= start <= end (end exclusive)"
        )


class MultipartUpload(abc.ABC):
    """One multipart upload: parts (numbered from 1, any order, in parallel), then complete.

    Use it as a context manager: leaving the block with an exception aborts
    the upload, so no pending parts are left behind to be billed.
    """

    key: str

    @abc.abstractmethod
    def upload_part(self, number: int, data: Buffer) -> None:
        """Store part ``number`` (1-based).  Every part but the last must meet the backend minimum.

        Backends that send a checksum may take a keyword ``crc32c``: the part's CRC32C (hex),
        already computed by the caller, sent instead of computing it again (see :func:`put_object`).
        """

    @abc.abstractmethod
    def complete(self) -> ObjectInfo:
        """Assemble the uploaded parts, in number order, into the object (honouring the mode)."""

    @abc.abstractmethod
    def abort(self) -> None:
        """Discard the parts; the object is not created.  Safe to call twice."""

    def __enter__(self) -> "MultipartUpload":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()


class Storage(abc.ABC):
    """A flat key space of immutable-while-read objects under one root URL."""

    url: str
    #: Smallest part a multipart upload accepts (except the last one).
    min_part_size: int = 1
    #: Part size used when a caller does not choose one.
    default_part_size: int = 16 * 1024 * 1024
    #: Whether ``create`` and ``IfMatch`` are enforced atomically by the store (the probe's finding).
    supports_conditional_writes: bool = True
    #: What the capability probe found, once the root was opened for writing (see capabilities.py).
    capabilities: "Capabilities | None" = None
    #: ``"unsupported"`` accepts a store that ignores conditional writes (single-writer mode).
    conditional_writes: str = "required"
    #: Whether ``read_into(..., size=N)`` checks the object's real size from the read itself.
    reads_check_size: bool = False

    @abc.abstractmethod
    def put(self, key: str, data: Buffer, mode: PutMode = "overwrite") -> ObjectInfo:
        """Store ``data`` under ``key`` according to ``mode``; return the new object's info.

        Backends that send a checksum with the body may take a keyword ``crc32c``: the CRC32C
        (hex) of ``data`` that the caller already computed, sent instead of reading every byte
        again.  Callers go through :func:`put_object`, which passes it only to those that do.
        """

    @abc.abstractmethod
    def get(self, key: str, range: tuple[int, int] | None = None) -> bytes:
        """Return the object's bytes, or bytes ``[start, end)`` of it when ``range`` is given."""

    def get_with_token(self, key: str) -> tuple[bytes, str]:
        """The whole object and its token (for a compare-and-swap); NotFound if it does not exist.

        Backends whose GET returns the token override this to save the HEAD; the token must be
        the one of the bytes returned.
        """
        token = self.head(key).token
        return self.get(key), token

    @abc.abstractmethod
    def head(self, key: str) -> ObjectInfo:
        """Return the object's info; raise NotFound if it does not exist."""

    @abc.abstractmethod
    def list(self, prefix: str = "", *, recursive: bool = True) -> list[ObjectInfo]:
        """Every object whose key starts with ``prefix``, sorted by key.

        With ``recursive=False`` only keys with no ``/`` after ``prefix`` (one
        "directory" level; object stores list it with a delimiter, so the
        chunks under ``chunks/`` are not paged through).
        """

    @abc.abstractmethod
    def delete(self, keys: Iterable[str]) -> None:
        """Delete ``keys`` (batched where the store allows); missing keys are ignored."""

    @abc.abstractmethod
    def copy(self, src: str, dst: str) -> ObjectInfo:
        """Copy ``src`` to ``dst`` inside the store without downloading it."""

    @abc.abstractmethod
    def multipart(self, key: str, mode: PutMode = "overwrite") -> MultipartUpload:
        """Start a multipart upload of ``key``; ``mode`` is checked when it completes."""

    @abc.abstractmethod
    def mark_expired(self, keys: Iterable[str]) -> None:
        """Flag ``keys`` for removal by the bucket's lifecycle rule (see cloudckpt.retention)."""

    def read_into(self, key: str, buffer: memoryview, offset: int = 0, *, size: int | None = None) -> int:
        """Read bytes ``[offset, offset + len(buffer))`` of the object into ``buffer``; return how many.

        ``size`` is the object's expected size: a store whose reads tell it the real size
        (``reads_check_size``) raises CorruptCheckpoint when they differ, which spares the
        caller a HEAD; other stores ignore it.  Backends that can read straight into caller
        memory override this to save a copy.
        """
        data = self.get(key, range=(offset, offset + len(buffer)))
        buffer[: len(data)] = data
        return len(data)

    def lend(self, key: str) -> memoryview | None:
        """A read-only view of the whole stored object that no later write can change, or None.

        A restore verifies a chunk through the view and copies from it only once the
        whole checkpoint has verified, so it needs no staging memory for that chunk.
        Stores whose objects are files never rewritten in place (a local directory:
        a memory map) lend views; the default, and every remote store, lends none.
        """
        return None

    def list_pending_uploads(self, prefix: str = "") -> list[PendingUpload]:
        """Multipart uploads started under ``prefix`` that were never completed or aborted."""
        return []

    def abort_pending_upload(self, pending: PendingUpload) -> None:
        """Abort one upload found by :meth:`list_pending_uploads`."""

    def close(self) -> None:
        """Release connections and threads.  The store must not be used afterwards."""

    def __enter__(self) -> "Storage":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.url!r})"


@functools.lru_cache(maxsize=None)
def _takes_crc32c(method: object) -> bool:
    try:
        parameters = inspect.signature(method).parameters  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return False
    return "crc32c" in parameters or any(p.kind is p.VAR_KEYWORD for p in parameters.values())


def with_crc32c(method: object, crc32c: str | None) -> dict[str, str]:
    """The keyword that hands ``crc32c`` to ``method`` (a ``put`` or ``upload_part``) if it takes one.

    Storage classes written before the keyword existed (and wrappers of them) get nothing and
    compute the checksum themselves, as they always did.
    """
    if crc32c is None:
        return {}
    return {"crc32c": crc32c} if _takes_crc32c(getattr(method, "__func__", method)) else {}


def put_object(store: Storage, key: str, data: Buffer, mode: PutMode = "overwrite", *,
               crc32c: str | None = None) -> ObjectInfo:
    """``store.put`` with the CRC32C (hex) the caller already computed, for backends that take it.

    Called the way callers always called ``put`` (``mode`` by keyword, and only when not the
    default), so wrappers written against that keep working.
    """
    extra: dict[str, object] = {} if mode == "overwrite" else {"mode": mode}
    return store.put(key, data, **extra, **with_crc32c(store.put, crc32c))


def part_size_for(store: Storage, part_size: int | None) -> int:
    """The part size :func:`upload_multipart` uses for ``part_size`` (None: the store's default)."""
    return max(part_size or store.default_part_size, store.min_part_size)


def upload_multipart(
    store: Storage,
    key: str,
    data: Buffer,
    *,
    mode: PutMode = "overwrite",
    part_size: int | None = None,
    concurrency: int = 8,
    part_crc32c: list[str] | None = None,
) -> ObjectInfo:
    """Upload ``data`` as a multipart object, parts in parallel; abort on any error.

    At most ``concurrency`` parts are in flight; parts are memoryview slices of
    ``data``, so no part is copied before the backend sends it.  ``part_crc32c``: the CRC32C
    (hex) of each part, cut at :func:`part_size_for`, when the caller computed them already.
    """
    part_size = part_size_for(store, part_size)
    view = memoryview(data).cast("B")
    count = max(1, -(-len(view) // part_size))
    if part_crc32c is not None and len(part_crc32c) != count:
        raise ValueError(f"{len(part_crc32c)} part checksums for {count} parts of {key!r}")
    failed = threading.Event()

    def send(number: int) -> None:
        if failed.is_set():
            return
        try:
            crc = part_crc32c[number - 1] if part_crc32c is not None else None
            upload.upload_part(number, view[(number - 1) * part_size : number * part_size],
                               **with_crc32c(upload.upload_part, crc))
        except BaseException:
            failed.set()
            raise

    upload = store.multipart(key, mode)
    try:
        with ThreadPoolExecutor(max_workers=max(1, min(concurrency, count))) as pool:
            futures = [pool.submit(send, n) for n in range(1, count + 1)]
            for future in futures:
                future.result()
        return upload.complete()
    except BaseException:
        upload.abort()
        raise
