"""What a store really does: a probe of conditional writes, checksums and upload listing.

cloudckpt's promises for several writers on one root rest on the store refusing a create-only
write of an existing key and a compare-and-swap with a stale token.  Several S3-compatible
stores accept the headers and ignore them.  :func:`check_writable` runs a short probe the first
time a process opens a root for writing (a few requests on a random key under
``.cloudckpt/probe/``, removed afterwards; cached per process for each store and endpoint) and
refuses a store that ignores the conditions unless the caller accepted single-writer mode with
``conditional_writes="unsupported"`` (see :mod:`cloudckpt.single_writer`).

>>> from cloudckpt.storage import MemoryStorage
>>> probe(MemoryStorage()).conditional_writes
True
"""

from __future__ import annotations

import logging
import threading
import uuid
from dataclasses import asdict, dataclass, replace
from typing import Any, Literal

from ..errors import AlreadyExists, CloudCkptError, NotFound, PreconditionFailed, TransientError
from .base import IfMatch, Storage

__all__ = [
    "CONDITIONAL_WRITES_OPTIONS", "Capabilities", "ConditionalWritesIgnored", "check_writable",
    "innermost", "probe",
]

log = logging.getLogger(__name__)

#: Where the probe writes (under the store's root); every probe object is deleted afterwards.
PROBE_PREFIX = ".cloudckpt/probe/"
#: Values of the ``conditional_writes`` storage option.
CONDITIONAL_WRITES_OPTIONS = ("required", "unsupported")
ConditionalWritesOption = Literal["required", "unsupported"]

_cache: dict[tuple[str, str, str | None], "Capabilities"] = {}
_cache_lock = threading.Lock()
_warned: set[tuple[str, str, str | None]] = set()


class ConditionalWritesIgnored(CloudCkptError):
    """The store accepted a conditional write it should have refused: it ignores the condition."""


@dataclass(frozen=True)
class Capabilities:
    """What one store was observed to do (or, for in-process backends, does by construction).

    ``create_only`` and ``if_match``: ``"enforced"``, ``"ignored"`` or ``"unknown"``.
    ``checksums``: whether the store reports its own CRC32C of stored objects
    (``"reported"``, ``"not reported"``).  ``upload_listing``: whether listing unfinished
    multipart uploads works (``"supported"``, ``"unsupported"``, ``"unknown"``).
    ``single_writer`` is True when conditional writes are ignored and the caller accepted it.
    """

    store: str
    backend: str
    endpoint: str | None
    endpoint_setting: str | None
    create_only: str
    if_match: str
    checksums: str
    upload_listing: str
    observations: tuple[str, ...] = ()
    probed: bool = True
    single_writer: bool = False

    @property
    def conditional_writes(self) -> bool:
        """Whether the store enforces both create-only writes and compare-and-swap."""
        return self.create_only == "enforced" and self.if_match == "enforced"

    def to_json(self) -> dict[str, Any]:
        body = asdict(self)
        body["observations"] = list(self.observations)
        body["conditional_writes"] = self.conditional_writes
        return body


def innermost(store: Storage) -> Storage:
    """The backend under any wrappers (retries, fault injection) that keep it as ``inner``."""
    seen = 0
    while isinstance(getattr(store, "inner", None), Storage) and seen < 16:
        store = store.inner  # type: ignore[attr-defined]
        seen += 1
    return store


def _identity(store: Storage) -> tuple[str, str, str | None]:
    backend = innermost(store)
    where = getattr(backend, "bucket", None) or backend.url
    return type(backend).__name__, str(where), getattr(backend, "endpoint", None)


def _by_construction(store: Storage) -> Capabilities | None:
    """In-process backends enforce the conditions themselves: nothing to probe."""
    from .local import LocalStorage
    from .memory import MemoryStorage

    backend = innermost(store)
    if isinstance(backend, MemoryStorage):
        how, checksums = "a lock around check and write", "reported"
    elif isinstance(backend, LocalStorage):
        how, checksums = "link(2) for create-only, flock around check and replace for If-Match", "not reported"
    else:
        return None
    return Capabilities(
        store=store.url, backend=type(backend).__name__, endpoint=None, endpoint_setting=None,
        create_only="enforced", if_match="enforced", checksums=checksums, upload_listing="supported",
        observations=(f"enforced by cloudckpt itself ({how})",), probed=False,
    )


def probe(store: Storage) -> Capabilities:
    """Observe the store: create-only, If-Match, reported checksums, upload listing.

    Writes one small object under ``.cloudckpt/probe/`` (five requests on it, then a delete)
    and lists unfinished uploads once.  Storage errors other than the refusals probed for
    propagate (a PermissionDenied means the credentials cannot write here at all).
    """
    backend = innermost(store)
    key = f"{PROBE_PREFIX}{uuid.uuid4().hex}"
    seen: list[str] = []
    first = store.put(key, b"cloudckpt capability probe: first", mode="create")
    try:
        try:
            store.put(key, b"cloudckpt capability probe: second", mode="create")
            create_only = "ignored"
            seen.append("a create-only write of an existing key (S3 If-None-Match: *, GCS ifGenerationMatch=0) "
                        "succeeded and replaced the object")
        except AlreadyExists:
            create_only = "enforced"
        store.put(key, b"cloudckpt capability probe: third, longer", mode="overwrite")
        try:
            store.put(key, b"cloudckpt capability probe: fourth", mode=IfMatch(first.token))
            if_match = "ignored"
            seen.append("a write conditional on a stale token (S3 If-Match, GCS ifGenerationMatch) succeeded "
                        "and replaced the object")
        except PreconditionFailed:
            if_match = "enforced"
        checksums = "reported" if store.head(key).crc32c else "not reported"
    finally:
        _remove(store, key)
    upload_listing = _upload_listing(store, seen)
    return Capabilities(
        store=store.url, backend=type(backend).__name__,
        endpoint=getattr(backend, "endpoint", None), endpoint_setting=getattr(backend, "endpoint_setting", None),
        create_only=create_only, if_match=if_match, checksums=checksums, upload_listing=upload_listing,
        observations=tuple(seen),
    )


def _remove(store: Storage, key: str) -> None:
    try:
        store.delete([key])
    except CloudCkptError as exc:
        log.warning("could not delete the capability probe object %s/%s (%s); it is harmless, "
                    "delete it by hand if you like", store.url, key, exc)


def _upload_listing(store: Storage, seen: list[str]) -> str:
    try:
        store.list_pending_uploads(PROBE_PREFIX)
    except TransientError:
        return "unknown"
    except NotFound:
        return "supported"  # nothing under the prefix yet, on a store that says so with a 404
    except CloudCkptError as exc:
        seen.append(f"listing unfinished multipart uploads failed: {exc}")
        return "unsupported"
    return "supported"


def capabilities_of(store: Storage) -> Capabilities:
    """The store's capabilities: known by construction, cached, or probed now (once per process)."""
    known = _by_construction(store)
    if known is not None:
        return known
    identity = _identity(store)
    with _cache_lock:
        cached = _cache.get(identity)
    if cached is not None:
        return replace(cached, store=store.url)
    found = probe(store)
    with _cache_lock:
        _cache[identity] = found
    return found


def _refusal(caps: Capabilities) -> str:
    where = caps.store + (f" (endpoint {caps.endpoint}, chosen by {caps.endpoint_setting})"
                          if caps.endpoint else "")
    ignored = " and ".join(name for name, verdict in (("create-only writes", caps.create_only),
                                                       ("If-Match", caps.if_match)) if verdict == "ignored")
    return (
        f"{where} ignores conditional writes ({ignored}): {'; '.join(caps.observations)}. "
        "cloudckpt relies on them so that a second writer on the same root (a zombie job, a "
        "rescheduled pod) can never replace a committed checkpoint, move latest or best backwards, "
        "or lose a pin. If only one process at a time ever writes to this root, accept the store "
        "with storage_options={'conditional_writes': 'unsupported'} (or "
        "open_storage(..., conditional_writes='unsupported')): single-writer mode, which re-reads "
        "every commit, pointer and index write and reports a lost race loudly "
        "(docs/RELIABILITY.md, 'Stores without conditional writes')."
    )


def check_option(value: Any) -> ConditionalWritesOption:
    if value not in CONDITIONAL_WRITES_OPTIONS:
        raise ValueError(f"conditional_writes must be one of {CONDITIONAL_WRITES_OPTIONS}, got {value!r}")
    return value


def check_writable(store: Storage, conditional_writes: ConditionalWritesOption | None = None) -> Capabilities:
    """Probe ``store`` once (cached) before its first write; refuse it if it ignores conditional writes.

    ``conditional_writes`` (default: the store's own ``conditional_writes`` attribute, else
    ``"required"``) set to ``"unsupported"`` accepts such a store in single-writer mode.  The
    result is set as ``store.capabilities`` (on every wrapper layer too) and returned.
    """
    option = check_option(conditional_writes or getattr(store, "conditional_writes", None) or "required")
    caps = capabilities_of(store)
    if not caps.conditional_writes:
        if option != "unsupported":
            raise ConditionalWritesIgnored(_refusal(caps))
        caps = replace(caps, single_writer=True)
        identity = _identity(store)
        with _cache_lock:
            first = identity not in _warned
            _warned.add(identity)
        if first:
            log.warning("%s ignores conditional writes; single-writer mode (conditional_writes='unsupported'): "
                        "only one process may write to it at a time, and lost races are detected only "
                        "after the fact", caps.store)
    _attach(store, caps)
    return caps


def _attach(store: Storage, caps: Capabilities) -> None:
    layer: Any = store
    for _ in range(16):
        layer.capabilities = caps
        layer.supports_conditional_writes = caps.conditional_writes
        layer = getattr(layer, "inner", None)
        if not isinstance(layer, Storage):
            break


def forget_cached() -> None:
    """Drop every cached probe result (the next write probes again)."""
    with _cache_lock:
        _cache.clear()
        _warned.clear()
