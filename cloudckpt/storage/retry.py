"""Retries of transient storage failures, and only those.

Backends raise :class:`~cloudckpt.errors.TransientError` for throttling, 5xx
answers, connection resets and timeouts; everything else (403, 404, 412,
a missing bucket) is permanent and passes through on the first attempt.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, TypeVar

import tenacity

from ..errors import AlreadyExists, EndpointUnreachable, NotFound, PreconditionFailed, TransientError
from .base import Buffer, MultipartUpload, ObjectInfo, PendingUpload, PutMode, Storage, put_object, with_crc32c

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff with full jitter, bounded by attempts and by total time.

    ``sleep`` is injectable so tests never wait: ``RetryPolicy(sleep=lambda s: None)``.
    """

    max_attempts: int = 8
    #: Attempts when nothing accepts connections at the endpoint (EndpointUnreachable).
    unreachable_attempts: int = 3
    initial_backoff: float = 0.2
    max_backoff: float = 10.0
    deadline: float = 300.0
    sleep: Callable[[float], None] = field(default=time.sleep, compare=False)

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError(f"max_attempts must be >= 1, got {self.max_attempts}")
        if self.unreachable_attempts < 1:
            raise ValueError(f"unreachable_attempts must be >= 1, got {self.unreachable_attempts}")

    def _stop(self, state: tenacity.RetryCallState) -> bool:
        if state.attempt_number >= self.max_attempts or state.seconds_since_start >= self.deadline:
            return True
        failure = state.outcome.exception() if state.outcome is not None else None
        return isinstance(failure, EndpointUnreachable) and state.attempt_number >= self.unreachable_attempts

    def call(self, what: str, fn: Callable[[], T]) -> T:
        """Run ``fn``, retrying it on TransientError; ``what`` names the call in logs."""
        retrying = tenacity.Retrying(
            stop=self._stop,
            wait=tenacity.wait_random_exponential(multiplier=self.initial_backoff, max=self.max_backoff),
            retry=tenacity.retry_if_exception_type(TransientError),
            sleep=self.sleep,
            reraise=True,
            before_sleep=lambda state: log.warning(
                "%s failed (attempt %d/%d), retrying: %s",
                what, state.attempt_number, self._budget(state), state.outcome.exception(),
            ),
        )
        return retrying(fn)

    def _budget(self, state: tenacity.RetryCallState) -> int:
        failure = state.outcome.exception() if state.outcome is not None else None
        unreachable = isinstance(failure, EndpointUnreachable)
        return min(self.max_attempts, self.unreachable_attempts) if unreachable else self.max_attempts


class RetryingStorage(Storage):
    """Wraps a backend so that every verb is retried by a :class:`RetryPolicy`.

    A conditional put whose first attempt failed in transit may have been
    applied; if its retry then reports AlreadyExists or PreconditionFailed, the
    stored bytes are compared with ours and an identical object counts as success.
    """

    def __init__(self, inner: Storage, policy: RetryPolicy | None = None) -> None:
        self.inner = inner
        self.policy = policy or RetryPolicy()
        self.url = inner.url
        self.min_part_size = inner.min_part_size
        self.default_part_size = inner.default_part_size
        self.supports_conditional_writes = inner.supports_conditional_writes
        self.reads_check_size = inner.reads_check_size

    def __getattr__(self, name: str) -> Any:
        # Backend extras (e.g. MemoryStorage.run_lifecycle) stay reachable through the wrapper.
        return getattr(self.inner, name)

    def _call(self, what: str, fn: Callable[[], T]) -> T:
        return self.policy.call(f"{what} on {self.url}", fn)

    def put(self, key: str, data: Buffer, mode: PutMode = "overwrite", *, crc32c: str | None = None) -> ObjectInfo:
        attempts = 0

        def attempt() -> ObjectInfo:
            nonlocal attempts
            attempts += 1
            try:
                return put_object(self.inner, key, data, mode, crc32c=crc32c)
            except (AlreadyExists, PreconditionFailed):
                if attempts > 1 and mode != "overwrite":
                    settled = self._settled_by_earlier_attempt(key, data)
                    if settled is not None:
                        return settled
                raise

        return self._call(f"put {key!r}", attempt)

    def _settled_by_earlier_attempt(self, key: str, data: Buffer) -> ObjectInfo | None:
        """The stored object if it holds exactly ``data`` (an earlier attempt stored it), else None.

        The check's own reads are retried; if they still fail, the TransientError propagates
        and the put is tried (and checked) again: reporting AlreadyExists for what may be our
        own write would fail a save whose checkpoint is in fact committed.
        """
        try:
            info = self.head(key)
            if info.size != len(memoryview(data).cast("B")) or self.get(key) != bytes(data):
                return None
        except NotFound:
            return None
        log.info("put %r: an earlier attempt that failed in transit had stored it", key)
        return info

    def get(self, key: str, range: tuple[int, int] | None = None) -> bytes:
        return self._call(f"get {key!r}", lambda: self.inner.get(key, range))

    def get_with_token(self, key: str) -> tuple[bytes, str]:
        return self._call(f"get {key!r}", lambda: self.inner.get_with_token(key))

    def read_into(self, key: str, buffer: memoryview, offset: int = 0, *, size: int | None = None) -> int:
        return self._call(f"get {key!r}", lambda: self.inner.read_into(key, buffer, offset, size=size))

    def lend(self, key: str) -> memoryview | None:
        return self._call(f"get {key!r}", lambda: self.inner.lend(key))

    def head(self, key: str) -> ObjectInfo:
        return self._call(f"head {key!r}", lambda: self.inner.head(key))

    def list(self, prefix: str = "", *, recursive: bool = True) -> list[ObjectInfo]:
        what = f"list of {prefix!r}" if prefix else "list of the root"
        return self._call(what, lambda: self.inner.list(prefix, recursive=recursive))

    def delete(self, keys: Iterable[str]) -> None:
        keys = list(keys)
        self._call(f"delete of {len(keys)} keys", lambda: self.inner.delete(keys))

    def copy(self, src: str, dst: str) -> ObjectInfo:
        return self._call(f"copy {src!r} -> {dst!r}", lambda: self.inner.copy(src, dst))

    def multipart(self, key: str, mode: PutMode = "overwrite") -> MultipartUpload:
        upload = self._call(f"start multipart {key!r}", lambda: self.inner.multipart(key, mode))
        return _RetryingUpload(upload, self, mode)

    def mark_expired(self, keys: Iterable[str]) -> None:
        keys = list(keys)
        self._call(f"mark {len(keys)} keys expired", lambda: self.inner.mark_expired(keys))

    def list_pending_uploads(self, prefix: str = "") -> list[PendingUpload]:
        return self._call("list pending uploads", lambda: self.inner.list_pending_uploads(prefix))

    def abort_pending_upload(self, pending: PendingUpload) -> None:
        self._call(f"abort upload of {pending.key!r}", lambda: self.inner.abort_pending_upload(pending))

    def close(self) -> None:
        self.inner.close()

    def __repr__(self) -> str:
        return f"RetryingStorage({self.inner!r})"


class _RetryingUpload(MultipartUpload):
    def __init__(self, inner: MultipartUpload, store: RetryingStorage, mode: PutMode = "overwrite") -> None:
        self._inner = inner
        self._store = store
        self._mode = mode
        self._sizes: dict[int, int] = {}
        self.key = inner.key

    def upload_part(self, number: int, data: Buffer, *, crc32c: str | None = None) -> None:
        extra = with_crc32c(self._inner.upload_part, crc32c)
        self._store._call(f"upload part {number} of {self.key!r}", lambda: self._inner.upload_part(number, data, **extra))
        self._sizes[number] = memoryview(data).nbytes

    def complete(self) -> ObjectInfo:
        attempts = 0

        def attempt() -> ObjectInfo:
            nonlocal attempts
            attempts += 1
            try:
                return self._inner.complete()
            except NotFound:
                # The upload is gone: an earlier attempt that failed in transit may have completed it.
                if attempts > 1 and self._mode == "overwrite":
                    settled = self._completed_by_earlier_attempt()
                    if settled is not None:
                        return settled
                raise

        return self._store._call(f"complete multipart {self.key!r}", attempt)

    def _completed_by_earlier_attempt(self) -> ObjectInfo | None:
        try:
            info = self._store.head(self.key)
        except NotFound:
            return None
        if info.size != sum(self._sizes.values()):
            return None
        log.info("complete multipart %r: an earlier attempt that failed in transit had completed it", self.key)
        return info

    def abort(self) -> None:
        self._store._call(f"abort multipart {self.key!r}", self._inner.abort)
