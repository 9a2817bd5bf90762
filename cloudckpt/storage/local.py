"""A local directory (or mounted filesystem) as a store.

Writes go to a temporary file beside the target, are fsynced, and then take
the final name atomically: ``os.replace`` for overwrite, ``os.link`` (which
fails if the name exists, even under concurrent writers) for create.  A
partial file never carries a final name.  Compare-and-swap holds an
``flock`` on a per-key lock file across the check and the rename.

Nothing of this machinery stays in the root once the writes are done: a lock
file is removed by its holder, and the multipart staging directory goes with
its last upload (see :meth:`LocalStorage._key_lock` for why removing a lock
file is safe).

With ``fsync=True`` (the default) every change to a directory is made durable
the way POSIX requires, by an fsync of that directory: after a rename or link
gives a file its name, after a directory (``chunks/ab/``) is created (its
parent is fsynced), and after deletes.  A power loss can therefore not keep a
manifest whose chunks' names were lost, nor undo the deletion of a manifest
whose chunks were then swept.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import fcntl
import os
import shutil
import uuid
from pathlib import Path
from typing import Iterable, Iterator
from urllib.parse import unquote, urlparse

import torch

from ..errors import AlreadyExists, NotFound, PermissionDenied, PreconditionFailed
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

_TMP_MARK = ".cloudckpt-tmp-"
_LOCK_SUFFIX = ".cloudckpt-lock"
_UPLOADS_DIR = ".cloudckpt-uploads"
_TMP_UPLOAD = "tmp:"  # upload ids of leftover temporary files


def _path_from_url(url: str) -> Path:
    if url.startswith("file://"):
        parsed = urlparse(url)
        if parsed.netloc not in ("", "localhost"):
            raise ValueError(f"{url!r}: file URLs must name a local path (file:///abs/path)")
        return Path(unquote(parsed.path))
    return Path(url).expanduser()


def _is_internal(name: str) -> bool:
    return _TMP_MARK in name or name.endswith(_LOCK_SUFFIX)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def _translate(op: str, key: str, url: str) -> Iterator[None]:
    try:
        yield
    except (FileNotFoundError, NotADirectoryError, IsADirectoryError) as exc:
        raise NotFound(f"{op} {url}/{key}: no such object") from exc
    except PermissionError as exc:
        raise PermissionDenied(
            f"{op} {url}/{key}: permission denied; check the directory's owner and mode"
        ) from exc


class LocalStorage(Storage):
    """Objects as files under a root directory (created on first write)."""

    min_part_size = 1
    default_part_size = 64 * 1024 * 1024
    supports_conditional_writes = True
    reads_check_size = True

    def __init__(self, root: str | os.PathLike[str], *, fsync: bool = True) -> None:
        text = os.fspath(root)
        self.root = _path_from_url(text).resolve()
        self.url = f"file://{self.root}"
        self.fsync = fsync

    # -- paths and atomic writes ---------------------------------------------
    def _path(self, key: str) -> Path:
        return self.root / check_key(key)

    def _make_dirs(self, directory: Path) -> None:
        """Create ``directory`` and missing parents; fsync the parent of each one created."""
        if directory.is_dir():
            return
        missing = []
        while not directory.is_dir():
            missing.append(directory)
            directory = directory.parent
        for path in reversed(missing):
            try:
                path.mkdir()
            except FileExistsError:
                continue  # another writer made it (and syncs its parent)
            if self.fsync:
                _fsync_dir(path.parent)

    def _write_tmp(self, final: Path, chunks: Iterable[Buffer]) -> Path:
        self._make_dirs(final.parent)
        tmp = final.with_name(f".{final.name}{_TMP_MARK}{uuid.uuid4().hex}")
        try:
            with open(tmp, "wb") as fh:
                for chunk in chunks:
                    fh.write(chunk)
                fh.flush()
                if self.fsync:
                    os.fsync(fh.fileno())
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return tmp

    def _commit(self, key: str, tmp: Path, final: Path, mode: PutMode) -> ObjectInfo:
        try:
            if mode == "overwrite":
                os.replace(tmp, final)
            elif mode == "create":
                try:
                    os.link(tmp, final)
                except FileExistsError as exc:
                    raise AlreadyExists(
                        f"create {self.url}/{key}: refused, the object already exists"
                    ) from exc
            elif isinstance(mode, IfMatch):
                with self._key_lock(final):
                    current = self._token(final)
                    if current != mode.token:
                        raise PreconditionFailed(
                            f"put {self.url}/{key}: refused, the object changed since token "
                            f"{mode.token!r} was read (now {current!r}); re-read and retry"
                        )
                    os.replace(tmp, final)
            else:
                raise ValueError(f"unknown put mode {mode!r}; use 'overwrite', 'create' or IfMatch(token)")
        finally:
            tmp.unlink(missing_ok=True)
        if self.fsync:
            _fsync_dir(final.parent)
        return self._info(key, final)

    @contextlib.contextmanager
    def _key_lock(self, final: Path) -> Iterator[None]:
        """Hold an exclusive ``flock`` on the key's lock file; the file is gone again afterwards.

        Only the holder removes the file, and it does so before unlocking.  A
        process that was waiting may then own a lock on the removed file, so
        after locking it checks that the path still names the file it holds,
        and starts over on a fresh file if not: two holders can never overlap.
        """
        lock_path = final.with_name(f".{final.name}{_LOCK_SUFFIX}")
        while True:
            with open(lock_path, "a+b") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX)
                try:
                    if not _names_open_file(lock_path, lock.fileno()):
                        continue  # its holder removed it while we waited
                    try:
                        yield
                    finally:
                        lock_path.unlink(missing_ok=True)
                    return
                finally:
                    fcntl.flock(lock, fcntl.LOCK_UN)

    @staticmethod
    def _token(path: Path) -> str | None:
        try:
            st = path.stat()
        except FileNotFoundError:
            return None
        return f"{st.st_ino:x}-{st.st_mtime_ns:x}-{st.st_size:x}"

    def _info(self, key: str, path: Path) -> ObjectInfo:
        st = path.stat()
        return ObjectInfo(
            key=key,
            size=st.st_size,
            token=f"{st.st_ino:x}-{st.st_mtime_ns:x}-{st.st_size:x}",
            last_modified=_dt.datetime.fromtimestamp(st.st_mtime, _dt.timezone.utc),
        )

    # -- Storage -------------------------------------------------------------
    def put(self, key: str, data: Buffer, mode: PutMode = "overwrite") -> ObjectInfo:
        final = self._path(key)
        with _translate("put", key, self.url):
            tmp = self._write_tmp(final, [data])
            return self._commit(key, tmp, final, mode)

    def get(self, key: str, range: tuple[int, int] | None = None) -> bytes:
        check_range(key, range)
        with _translate("get", key, self.url), open(self._path(key), "rb") as fh:
            if range is None:
                return fh.read()
            fh.seek(range[0])
            return fh.read(range[1] - range[0])

    def read_into(self, key: str, buffer: memoryview, offset: int = 0, *, size: int | None = None) -> int:
        """Read straight from the file into ``buffer`` (no intermediate bytes object)."""
        with _translate("get", key, self.url), open(self._path(key), "rb", buffering=0) as fh:
            check_size(self.url, key, os.fstat(fh.fileno()).st_size, size)
            fh.seek(offset)
            view, done = memoryview(buffer).cast("B"), 0
            while done < len(view):
                n = fh.readinto(view[done:])
                if not n:
                    break
                done += n
            return done

    def lend(self, key: str) -> memoryview:
        """The file, memory-mapped copy-on-write: a chunk file is never rewritten in place (writes
        replace it by rename), so the mapping keeps the bytes it had, even if the name is deleted.

        The map holds no file descriptor (``mmap.mmap`` would keep one per view, and a restore holds
        a view of every chunk until it commits: thousands of chunks would exhaust the process's limit).
        """
        path = self._path(key)
        with _translate("get", key, self.url):
            size = path.stat().st_size
            if size == 0:
                return memoryview(bytearray())
            try:
                mapped = torch.from_file(str(path), shared=False, size=size, dtype=torch.uint8)
            except RuntimeError as exc:  # replaced by a shorter file or removed since the stat
                raise FileNotFoundError(f"{path} changed while it was being mapped") from exc
        return mapped.numpy().data

    def head(self, key: str) -> ObjectInfo:
        with _translate("head", key, self.url):
            path = self._path(key)
            if path.is_dir():
                raise IsADirectoryError(path)
            return self._info(key, path)

    def list(self, prefix: str = "", *, recursive: bool = True) -> list[ObjectInfo]:
        check_prefix(prefix)
        start = self.root / prefix.rsplit("/", 1)[0] if "/" in prefix else self.root
        found: list[ObjectInfo] = []
        for dirpath, dirnames, filenames in os.walk(start):
            here = Path(dirpath)
            if not recursive:
                dirnames[:] = []
            elif here == self.root:
                dirnames[:] = [d for d in dirnames if d != _UPLOADS_DIR]
            for name in filenames:
                if _is_internal(name):
                    continue
                key = (here / name).relative_to(self.root).as_posix()
                if key.startswith(prefix):
                    with contextlib.suppress(FileNotFoundError):
                        found.append(self._info(key, here / name))
        return sorted(found, key=lambda info: info.key)

    def delete(self, keys: Iterable[str]) -> None:
        touched: set[Path] = set()
        for key in keys:
            path = self._path(key)
            with _translate("delete", key, self.url):
                path.unlink(missing_ok=True)
            touched.add(path.parent)
        if self.fsync:  # the deletes are durable before the caller goes on (e.g. to sweep chunks)
            for directory in touched:
                with contextlib.suppress(FileNotFoundError):
                    _fsync_dir(directory)

    def copy(self, src: str, dst: str) -> ObjectInfo:
        source, final = self._path(src), self._path(dst)
        with _translate("copy", src, self.url), open(source, "rb") as fh:
            tmp = self._write_tmp(final, iter(lambda: fh.read(8 << 20), b""))
        return self._commit(dst, tmp, final, "overwrite")

    def multipart(self, key: str, mode: PutMode = "overwrite") -> MultipartUpload:
        check_key(key)
        upload_id = uuid.uuid4().hex
        staging = self.root / _UPLOADS_DIR / upload_id
        for _ in range(100):
            try:
                staging.mkdir(parents=True)
                break
            except FileNotFoundError:  # another upload removed the empty uploads directory in between
                continue
        else:
            staging.mkdir(parents=True)
        (staging / "key").write_text(key)
        return _LocalUpload(self, key, mode, staging)

    def mark_expired(self, keys: Iterable[str]) -> None:
        """A directory has no lifecycle engine: marking an object expired deletes it now."""
        self.delete(keys)

    def list_pending_uploads(self, prefix: str = "") -> list[PendingUpload]:
        """Unfinished multipart uploads, and temporary files of writes a killed process never finished."""
        uploads = self.root / _UPLOADS_DIR
        pending = []
        if uploads.is_dir():
            for staging in sorted(uploads.iterdir()):
                with contextlib.suppress(FileNotFoundError):
                    key = (staging / "key").read_text()
                    started = _dt.datetime.fromtimestamp(staging.stat().st_mtime, _dt.timezone.utc)
                    if key.startswith(prefix):
                        pending.append(PendingUpload(key, staging.name, started))
        start = self.root / prefix.rsplit("/", 1)[0] if "/" in prefix else self.root
        for dirpath, dirnames, filenames in os.walk(start):
            here = Path(dirpath)
            dirnames[:] = [d for d in dirnames if not (here == self.root and d == _UPLOADS_DIR)]
            for name in filenames:
                if _TMP_MARK not in name or not name.startswith("."):
                    continue
                final = name[1:name.index(_TMP_MARK)]
                key = (here / final).relative_to(self.root).as_posix()
                with contextlib.suppress(FileNotFoundError):
                    started = _dt.datetime.fromtimestamp((here / name).stat().st_mtime, _dt.timezone.utc)
                    if key.startswith(prefix):
                        pending.append(PendingUpload(key, _TMP_UPLOAD + (here / name).relative_to(self.root).as_posix(),
                                                     started))
        return pending

    def abort_pending_upload(self, pending: PendingUpload) -> None:
        if pending.upload_id.startswith(_TMP_UPLOAD):
            tmp = self.root / check_key(pending.upload_id[len(_TMP_UPLOAD):])
            if _TMP_MARK in tmp.name:
                tmp.unlink(missing_ok=True)
            return
        _remove_staging(self.root / _UPLOADS_DIR / check_key(pending.upload_id))


class _LocalUpload(MultipartUpload):
    def __init__(self, store: LocalStorage, key: str, mode: PutMode, staging: Path) -> None:
        self._store = store
        self.key = key
        self._mode = mode
        self._staging = staging

    def upload_part(self, number: int, data: Buffer) -> None:
        if number < 1:
            raise ValueError(f"part numbers start at 1, got {number}")
        if not self._staging.is_dir():
            raise NotFound(f"multipart upload of {self._store.url}/{self.key} was aborted or completed")
        with open(self._staging / f"part-{number:05d}", "wb") as fh:
            fh.write(data)

    def complete(self) -> ObjectInfo:
        parts = sorted(self._staging.glob("part-*"))
        numbers = [int(p.name.split("-")[1]) for p in parts]
        if numbers != list(range(1, len(numbers) + 1)):
            raise ValueError(f"multipart upload of {self.key!r} has gaps in its parts: {numbers}")

        def read_parts() -> Iterator[bytes]:
            for part in parts:
                with open(part, "rb") as fh:
                    yield from iter(lambda: fh.read(8 << 20), b"")

        final = self._store._path(self.key)
        try:
            with _translate("complete multipart", self.key, self._store.url):
                tmp = self._store._write_tmp(final, read_parts())
                return self._store._commit(self.key, tmp, final, self._mode)
        finally:
            self.abort()

    def abort(self) -> None:
        _remove_staging(self._staging)


def _remove_staging(staging: Path) -> None:
    """Remove one upload's staging directory, and the uploads directory once it is empty."""
    shutil.rmtree(staging, ignore_errors=True)
    with contextlib.suppress(OSError):  # not empty: other uploads are in progress
        staging.parent.rmdir()


def _names_open_file(path: Path, fd: int) -> bool:
    """Whether ``path`` still names the file open as ``fd`` (not removed or replaced since)."""
    try:
        named = path.stat()
    except FileNotFoundError:
        return False
    held = os.fstat(fd)
    return (named.st_dev, named.st_ino) == (held.st_dev, held.st_ino)
