"""A Storage wrapper that fails on purpose, for tests of everything built on storage.

    store = FaultyStorage(MemoryStorage(), [Fault("put", nth=3, kind="crash_after")])

``crash_before`` / ``crash_after`` raise :class:`~cloudckpt.errors.SimulatedCrash`
(a ``BaseException``) before the call reaches the inner store, or after it took
effect: the two moments a real process can die around a request.  ``transient``
and ``permanent`` raise TransientError / PermissionDenied before the call;
``lost_response`` lets the call take effect, then raises TransientError (the
reply was lost in transit, so the caller cannot tell whether it happened).
Every call is recorded in ``calls`` so a test can first count the calls of an
operation, then crash at each one in turn.
"""

from __future__ import annotations

import random
import threading
from collections import Counter
from dataclasses import dataclass
from typing import Callable, Iterable, Literal, TypeVar

from ..errors import PermissionDenied, SimulatedCrash, TransientError
from .base import Buffer, MultipartUpload, ObjectInfo, PendingUpload, PutMode, Storage, put_object, with_crc32c

T = TypeVar("T")
FaultKind = Literal["transient", "permanent", "crash_before", "crash_after", "lost_response"]
VERBS = ("put", "get", "head", "list", "delete", "copy", "multipart",
         "upload_part", "complete", "abort", "mark_expired",
         "list_pending_uploads", "abort_pending_upload")


@dataclass
class Fault:
    """Fail the ``nth`` call (1-based) of ``verb`` (any verb when None) whose key starts with ``key_prefix``.

    ``times`` consecutive matching calls fail, starting at the ``nth``.
    """

    verb: str | None = None
    nth: int = 1
    kind: FaultKind = "transient"
    key_prefix: str = ""
    times: int = 1

    def __post_init__(self) -> None:
        if self.verb is not None and self.verb not in VERBS:
            raise ValueError(f"unknown verb {self.verb!r}; one of {VERBS}")
        self._seen = 0

    def matches(self, verb: str, key: str) -> bool:
        if (self.verb is not None and verb != self.verb) or not key.startswith(self.key_prefix):
            return False
        self._seen += 1
        return self.nth <= self._seen < self.nth + self.times


class FaultyStorage(Storage):
    """Injects the given faults, plus random transient failures at ``transient_rate``."""

    def __init__(
        self,
        inner: Storage,
        faults: Iterable[Fault] = (),
        *,
        transient_rate: float = 0.0,
        seed: int = 0,
    ) -> None:
        self.inner = inner
        self.faults = list(faults)
        self.transient_rate = transient_rate
        self.url = inner.url
        self.min_part_size = inner.min_part_size
        self.default_part_size = inner.default_part_size
        self.supports_conditional_writes = inner.supports_conditional_writes
        self.reads_check_size = inner.reads_check_size
        self.calls: list[tuple[str, str]] = []
        self.counts: Counter[str] = Counter()
        self.bytes_put = 0
        self.injected = 0
        self._random = random.Random(seed)
        self._lock = threading.Lock()

    def __getattr__(self, name: str):
        return getattr(self.inner, name)

    def _run(self, verb: str, key: str, fn: Callable[[], T], nbytes: int = 0) -> T:
        with self._lock:
            self.calls.append((verb, key))
            self.counts[verb] += 1
            fault = next((f for f in self.faults if f.matches(verb, key)), None)
            if fault is None and self.transient_rate and self._random.random() < self.transient_rate:
                fault = Fault(verb, kind="transient")
            if fault is not None:
                self.injected += 1
        where = f"{verb} {key!r} on {self.url}"
        if fault is not None and fault.kind == "transient":
            raise TransientError(f"injected transient failure: {where}")
        if fault is not None and fault.kind == "permanent":
            raise PermissionDenied(f"injected permanent failure: {where}")
        if fault is not None and fault.kind == "crash_before":
            raise SimulatedCrash(f"crash before {where}")
        try:
            result = fn()
        except Exception as exc:  # the call answered with an error; a process can die right after that too
            if fault is not None and fault.kind == "crash_after":
                raise SimulatedCrash(f"crash after {where} (which failed: {type(exc).__name__})") from exc
            raise
        if nbytes:
            with self._lock:
                self.bytes_put += nbytes
        if fault is not None and fault.kind == "crash_after":
            raise SimulatedCrash(f"crash after {where}")
        if fault is not None and fault.kind == "lost_response":
            raise TransientError(f"injected lost response: {where} took effect")
        return result

    def put(self, key: str, data: Buffer, mode: PutMode = "overwrite", *, crc32c: str | None = None) -> ObjectInfo:
        return self._run("put", key, lambda: put_object(self.inner, key, data, mode, crc32c=crc32c),
                         memoryview(data).nbytes)

    def get(self, key: str, range: tuple[int, int] | None = None) -> bytes:
        return self._run("get", key, lambda: self.inner.get(key, range))

    def get_with_token(self, key: str) -> tuple[bytes, str]:
        return self._run("get", key, lambda: self.inner.get_with_token(key))

    def read_into(self, key: str, buffer: memoryview, offset: int = 0, *, size: int | None = None) -> int:
        return self._run("get", key, lambda: self.inner.read_into(key, buffer, offset, size=size))

    def lend(self, key: str) -> memoryview | None:
        return self._run("get", key, lambda: self.inner.lend(key))

    def head(self, key: str) -> ObjectInfo:
        return self._run("head", key, lambda: self.inner.head(key))

    def list(self, prefix: str = "", *, recursive: bool = True) -> list[ObjectInfo]:
        return self._run("list", prefix, lambda: self.inner.list(prefix, recursive=recursive))

    def delete(self, keys: Iterable[str]) -> None:
        keys = list(keys)
        self._run("delete", keys[0] if keys else "", lambda: self.inner.delete(keys))

    def copy(self, src: str, dst: str) -> ObjectInfo:
        return self._run("copy", dst, lambda: self.inner.copy(src, dst))

    def multipart(self, key: str, mode: PutMode = "overwrite") -> MultipartUpload:
        return _FaultyUpload(self._run("multipart", key, lambda: self.inner.multipart(key, mode)), self)

    def mark_expired(self, keys: Iterable[str]) -> None:
        keys = list(keys)
        self._run("mark_expired", keys[0] if keys else "", lambda: self.inner.mark_expired(keys))

    def list_pending_uploads(self, prefix: str = "") -> list[PendingUpload]:
        return self._run("list_pending_uploads", prefix, lambda: self.inner.list_pending_uploads(prefix))

    def abort_pending_upload(self, pending: PendingUpload) -> None:
        self._run("abort_pending_upload", pending.key, lambda: self.inner.abort_pending_upload(pending))

    def close(self) -> None:
        self.inner.close()


class _FaultyUpload(MultipartUpload):
    def __init__(self, inner: MultipartUpload, store: FaultyStorage) -> None:
        self._inner = inner
        self._store = store
        self.key = inner.key

    def upload_part(self, number: int, data: Buffer, *, crc32c: str | None = None) -> None:
        extra = with_crc32c(self._inner.upload_part, crc32c)
        self._store._run("upload_part", self.key, lambda: self._inner.upload_part(number, data, **extra),
                         memoryview(data).nbytes)

    def complete(self) -> ObjectInfo:
        return self._store._run("complete", self.key, self._inner.complete)

    def abort(self) -> None:
        self._store._run("abort", self.key, self._inner.abort)
