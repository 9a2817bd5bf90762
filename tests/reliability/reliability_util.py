"""Helpers of the reliability suite: the count report, a fake clock, a storage that dies, states."""

from __future__ import annotations

import datetime as _dt
import threading
from typing import Any, Callable

import torch

from cloudckpt import CheckpointManager
from cloudckpt.errors import NotFound, SimulatedCrash
from cloudckpt.pointers import LATEST_POINTER, read_pointer
from cloudckpt.reader import load_manifest
from cloudckpt.storage import Storage
from cloudckpt.storage.faults import FaultyStorage

KiB = 1024
MiB = 1024 * KiB

#: Count lines of this session, shown again by conftest's terminal summary.
SUMMARY: list[str] = []


def report(line: str) -> None:
    """Print a count line now (seen with -s) and keep it for the end-of-run summary."""
    SUMMARY.append(line)
    print(line, flush=True)


class Clock:
    """Wall-clock time plus an adjustable offset: ``advance`` makes time pass for sweepers and stores."""

    def __init__(self) -> None:
        self.offset = _dt.timedelta(0)

    def __call__(self) -> _dt.datetime:
        return _dt.datetime.now(_dt.timezone.utc) + self.offset

    def advance(self, delta: _dt.timedelta) -> None:
        self.offset += delta


class DyingStorage(FaultyStorage):
    """A FaultyStorage whose injected crash is final: after it, every call raises SimulatedCrash.

    FaultyStorage alone lets the code under test go on after the crash (clean-up
    handlers abort multipart uploads, other upload threads keep writing).  A
    killed process does none of that; this wrapper models the kill.
    """

    dead = False

    def _run(self, verb: str, key: str, fn: Callable[[], Any], nbytes: int = 0) -> Any:
        if self.dead:
            raise SimulatedCrash(f"the process is dead: {verb} {key!r} never happens")
        try:
            return super()._run(verb, key, fn, nbytes)
        except SimulatedCrash:
            self.dead = True
            raise


class Gate:
    """One pause point: ``hold()`` blocks the calling thread until ``release()``; ``reached`` tells it got there."""

    def __init__(self) -> None:
        self.reached = threading.Event()
        self._open = threading.Event()

    def hold(self, timeout: float = 30.0) -> None:
        self.reached.set()
        if not self._open.wait(timeout):
            raise AssertionError("the test never released the gate")

    def release(self) -> None:
        self._open.set()


class PausingStorage(FaultyStorage):
    """Pauses the first create-only manifest write (the commit) until its gate is released."""

    def __init__(self, inner: Storage) -> None:
        super().__init__(inner)
        self.gate: Gate | None = None

    def pause_next_commit(self) -> Gate:
        self.gate = Gate()
        return self.gate

    def put(self, key, data, mode="overwrite"):
        gate = self.gate
        if gate is not None and mode == "create" and key.endswith(".ckpt") and "/" not in key:
            self.gate = None
            gate.hold()
        return super().put(key, data, mode)


# -- states -----------------------------------------------------------------------------------
def step_state(step: int, *, shared_floats: int = 16 * KiB, floats: int = 30_000, small: int = 10) -> dict:
    """A deterministic state for ``step``: a tensor shared by every step, one new per step, a small one."""
    g = torch.Generator().manual_seed(1000 + step)
    shared = torch.Generator().manual_seed(7)
    return {
        "model": {
            "shared": torch.randn(shared_floats, generator=shared),
            "w": torch.randn(floats, generator=g),
            "b": torch.randn(small, generator=g),
        },
        "progress": {"step": step},
    }


def blank_like(state: Any) -> Any:
    if isinstance(state, torch.Tensor):
        return torch.full_like(state, float("nan")) if state.is_floating_point() else torch.zeros_like(state)
    if isinstance(state, dict):
        return {k: blank_like(v) for k, v in state.items()}
    if isinstance(state, int):
        return -1
    return state


def _raw(t: torch.Tensor) -> bytes:
    return t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def same_state(actual: Any, expected: Any) -> bool:
    """Deep equality, tensors bit for bit (dtype, shape and bytes)."""
    if isinstance(expected, torch.Tensor):
        return (isinstance(actual, torch.Tensor) and actual.dtype == expected.dtype
                and actual.shape == expected.shape
                and _raw(actual) == _raw(expected))
    if isinstance(expected, dict):
        return isinstance(actual, dict) and actual.keys() == expected.keys() and all(
            same_state(actual[k], expected[k]) for k in expected)
    return actual == expected


# -- store inspection -------------------------------------------------------------------------
def manifest_names(store: Storage) -> list[str]:
    from cloudckpt.pointers import is_pointer_key

    return sorted(i.key for i in store.list("")
                  if "/" not in i.key and i.key.endswith(".ckpt") and not is_pointer_key(i.key))


def audit(store: Storage, **manager_options: Any) -> dict[str, Any]:
    """What a fresh reader finds: committed names, those that are partial, dangling pointers, chunks."""
    mgr = CheckpointManager(store, capture_rng=False, **manager_options)
    names = manifest_names(store)
    partial, referenced = [], set()
    for name in names:
        try:
            manifest = load_manifest(store, name)
            referenced |= {c.key for c in manifest.chunks}
            mgr.verify(name)
        except Exception as exc:  # noqa: BLE001 - any failure of a visible checkpoint counts
            partial.append(f"{name}: {type(exc).__name__}: {exc}")
    dangling = []
    try:
        pointer = read_pointer(store, LATEST_POINTER)
    except Exception as exc:  # noqa: BLE001
        dangling.append(f"{LATEST_POINTER} unreadable: {exc}")
    else:
        if pointer is not None and pointer.target not in names:
            dangling.append(f"{LATEST_POINTER} -> {pointer.target}")
    chunks = {i.key for i in store.list("chunks/")}
    return {"names": names, "partial": partial, "dangling": dangling, "chunks": chunks,
            "referenced": referenced, "unreferenced": chunks - referenced,
            "missing": referenced - chunks, "pending": store.list_pending_uploads("")}


def head_or_none(store: Storage, key: str):
    try:
        return store.head(key)
    except NotFound:
        return None


class LostResponses(Storage):
    """Applies every call, then, for a seeded share of them, raises TransientError anyway.

    This is the ambiguous failure of a real network: the request reached the store and took
    effect, but the answer was lost (a reset or a timeout), so the caller cannot tell.  Retries
    above it must then cope with an effect that already happened (a create that now "exists").
    """

    def __init__(self, inner: Storage, rate: float, seed: int = 0) -> None:
        import random

        from cloudckpt.errors import TransientError

        self.inner = inner
        self.rate = rate
        self.url = inner.url
        self.min_part_size = inner.min_part_size
        self.default_part_size = inner.default_part_size
        self.lost = 0
        self._random = random.Random(seed)
        self._lock = threading.Lock()
        self._error = TransientError

    def _after(self, what: str, fn: Callable[[], Any]) -> Any:
        result = fn()
        with self._lock:
            lose = self._random.random() < self.rate
            self.lost += lose
        if lose:
            raise self._error(f"response lost after {what} took effect on {self.url}")
        return result

    def put(self, key, data, mode="overwrite"):
        return self._after(f"put {key!r}", lambda: self.inner.put(key, data, mode))

    def get(self, key, range=None):
        return self._after(f"get {key!r}", lambda: self.inner.get(key, range))

    def head(self, key):
        return self._after(f"head {key!r}", lambda: self.inner.head(key))

    def list(self, prefix="", **options):
        return self._after(f"list {prefix!r}", lambda: self.inner.list(prefix, **options))

    def delete(self, keys):
        keys = [*keys]
        return self._after("delete", lambda: self.inner.delete(keys))

    def copy(self, src, dst):
        return self._after(f"copy {dst!r}", lambda: self.inner.copy(src, dst))

    def multipart(self, key, mode="overwrite"):
        return _LostUpload(self._after(f"multipart {key!r}", lambda: self.inner.multipart(key, mode)), self)

    def mark_expired(self, keys):
        keys = [*keys]
        return self._after("mark_expired", lambda: self.inner.mark_expired(keys))

    def list_pending_uploads(self, prefix=""):
        return self._after("list_pending_uploads", lambda: self.inner.list_pending_uploads(prefix))

    def abort_pending_upload(self, pending):
        return self._after("abort_pending_upload", lambda: self.inner.abort_pending_upload(pending))

    def close(self):
        self.inner.close()


class _LostUpload:
    def __init__(self, inner, store: LostResponses) -> None:
        self._inner = inner
        self._store = store
        self.key = inner.key

    def upload_part(self, number, data):
        return self._store._after(f"upload_part {number}", lambda: self._inner.upload_part(number, data))

    def complete(self):
        return self._store._after(f"complete {self.key!r}", self._inner.complete)

    def abort(self):
        return self._store._after(f"abort {self.key!r}", self._inner.abort)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None:
            self.abort()


SDK_LOGGERS = ("botocore", "boto3", "urllib3", "google", "google.auth", "s3transfer")


def invoke_cli(args: list[str]):
    """Run the ``cloudckpt`` command in this process (click's CliRunner).

    The command quiets the SDKs' loggers (it sets them to ERROR below -vv); their levels are put
    back afterwards, so later tests in this process still see the SDKs' records.
    """
    import logging

    from click.testing import CliRunner

    from cloudckpt.cli import cli

    levels = {name: logging.getLogger(name).level for name in SDK_LOGGERS}
    try:
        return CliRunner().invoke(cli, args)
    finally:
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)
