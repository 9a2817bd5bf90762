"""An in-process store with honest semantics: modes, tokens, multipart and lifecycle marks.

It exists for fast logic tests and fault injection (users may use it in
theirs too).  Every object carries a generation number that changes on each
write, so compare-and-swap behaves as it does on GCS.
"""

from __future__ import annotations

import datetime as _dt
import itertools
import threading
import uuid
from dataclasses import dataclass
from typing import Iterable

from ..errors import AlreadyExists, NotFound, PreconditionFailed
from ..hashing import crc32c_hex
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
    is_direct_child,
)


@dataclass
class _Object:
    data: bytes
    generation: int
    modified: _dt.datetime
    expired: bool = False


class MemoryStorage(Storage):
    """A thread-safe dict of objects.  ``MemoryStorage()`` starts empty."""

    min_part_size = 1
    default_part_size = 8 * 1024 * 1024

    reads_check_size = True

    def __init__(self, url: str = "memory://", *, clock=None) -> None:
        self.url = url
        self._clock = clock or (lambda: _dt.datetime.now(_dt.timezone.utc))
        self._objects: dict[str, _Object] = {}
        self._pending: dict[str, tuple[str, PutMode, dict[int, bytes], _dt.datetime]] = {}
        self._lock = threading.Lock()
        self._generations = itertools.count(1)

    # -- helpers -------------------------------------------------------------
    def _info(self, key: str, obj: _Object) -> ObjectInfo:
        return ObjectInfo(
            key=key,
            size=len(obj.data),
            token=str(obj.generation),
            last_modified=obj.modified,
            crc32c=crc32c_hex(obj.data),
        )

    def _check_mode(self, key: str, mode: PutMode) -> None:
        current = self._objects.get(key)
        if mode == "create":
            if current is not None:
                raise AlreadyExists(f"{self.url}: create of {key!r} refused, the key already exists")
        elif isinstance(mode, IfMatch):
            if current is None or str(current.generation) != mode.token:
                raise PreconditionFailed(
                    f"{self.url}: write of {key!r} refused, it changed since token {mode.token!r} "
                    "was read; re-read it and retry"
                )
        elif mode != "overwrite":
            raise ValueError(f"unknown put mode {mode!r}; use 'overwrite', 'create' or IfMatch(token)")

    def _store(self, key: str, data: bytes, mode: PutMode) -> ObjectInfo:
        with self._lock:
            self._check_mode(key, mode)
            obj = _Object(data=data, generation=next(self._generations), modified=self._clock())
            self._objects[key] = obj
            return self._info(key, obj)

    # -- Storage -------------------------------------------------------------
    def put(self, key: str, data: Buffer, mode: PutMode = "overwrite") -> ObjectInfo:
        check_key(key)
        return self._store(key, bytes(data), mode)

    def _object(self, key: str) -> _Object:
        """The object stored under ``key``; NotFound if there is none."""
        check_key(key)
        with self._lock:
            obj = self._objects.get(key)
        if obj is None:
            raise NotFound(f"{self.url}: no object {key!r}")
        return obj

    def get(self, key: str, range: tuple[int, int] | None = None) -> bytes:
        check_range(key, range)
        obj = self._object(key)
        if range is None:
            return obj.data
        return obj.data[range[0] : range[1]]

    def get_with_token(self, key: str) -> tuple[bytes, str]:
        obj = self._object(key)
        return obj.data, str(obj.generation)

    def read_into(self, key: str, buffer: memoryview, offset: int = 0, *, size: int | None = None) -> int:
        obj = self._object(key)
        check_size(self.url, key, len(obj.data), size)
        data = obj.data[offset : offset + len(buffer)]
        memoryview(buffer).cast("B")[: len(data)] = data
        return len(data)

    def head(self, key: str) -> ObjectInfo:
        check_key(key)
        with self._lock:
            obj = self._objects.get(key)
            if obj is None:
                raise NotFound(f"{self.url}: no object {key!r}")
            return self._info(key, obj)

    def list(self, prefix: str = "", *, recursive: bool = True) -> list[ObjectInfo]:
        check_prefix(prefix)
        with self._lock:
            items = [(k, o) for k, o in self._objects.items()
                     if k.startswith(prefix) and (recursive or is_direct_child(k, prefix))]
        return [self._info(k, o) for k, o in sorted(items, key=lambda item: item[0])]

    def delete(self, keys: Iterable[str]) -> None:
        keys = [check_key(k) for k in keys]
        with self._lock:
            for key in keys:
                self._objects.pop(key, None)

    def copy(self, src: str, dst: str) -> ObjectInfo:
        return self._store(check_key(dst), self.get(src), "overwrite")

    def multipart(self, key: str, mode: PutMode = "overwrite") -> MultipartUpload:
        check_key(key)
        upload_id = uuid.uuid4().hex
        with self._lock:
            self._pending[upload_id] = (key, mode, {}, self._clock())
        return _MemoryUpload(self, key, upload_id)

    def mark_expired(self, keys: Iterable[str]) -> None:
        with self._lock:
            for key in keys:
                obj = self._objects.get(check_key(key))
                if obj is not None:
                    obj.expired = True

    def is_marked_expired(self, key: str) -> bool:
        """Whether :meth:`mark_expired` flagged ``key`` (a lifecycle rule would remove it)."""
        with self._lock:
            obj = self._objects.get(key)
            return bool(obj and obj.expired)

    def run_lifecycle(self) -> int:
        """Remove every object flagged by :meth:`mark_expired`, as a bucket rule would; return the count."""
        with self._lock:
            doomed = [k for k, o in self._objects.items() if o.expired]
            for key in doomed:
                del self._objects[key]
        return len(doomed)

    def list_pending_uploads(self, prefix: str = "") -> list[PendingUpload]:
        with self._lock:
            return sorted(
                (PendingUpload(key, upload_id, started)
                 for upload_id, (key, _, _, started) in self._pending.items()
                 if key.startswith(prefix)),
                key=lambda p: (p.key, p.upload_id),
            )

    def abort_pending_upload(self, pending: PendingUpload) -> None:
        with self._lock:
            self._pending.pop(pending.upload_id, None)


class _MemoryUpload(MultipartUpload):
    def __init__(self, store: MemoryStorage, key: str, upload_id: str) -> None:
        self._store = store
        self.key = key
        self._upload_id = upload_id

    def _entry(self):
        entry = self._store._pending.get(self._upload_id)
        if entry is None:
            raise NotFound(f"{self._store.url}: multipart upload of {self.key!r} was aborted or completed")
        return entry

    def upload_part(self, number: int, data: Buffer) -> None:
        if number < 1:
            raise ValueError(f"part numbers start at 1, got {number}")
        with self._store._lock:
            self._entry()[2][number] = bytes(data)

    def complete(self) -> ObjectInfo:
        with self._store._lock:
            key, mode, parts, _ = self._entry()
            numbers = sorted(parts)
            if numbers != list(range(1, len(numbers) + 1)):
                raise ValueError(f"multipart upload of {key!r} has gaps in its parts: {numbers}")
            data = b"".join(parts[n] for n in numbers)
            self._store._check_mode(key, mode)
            del self._store._pending[self._upload_id]
            obj = _Object(data=data, generation=next(self._store._generations), modified=self._store._clock())
            self._store._objects[key] = obj
            return self._store._info(key, obj)

    def abort(self) -> None:
        with self._store._lock:
            self._store._pending.pop(self._upload_id, None)
