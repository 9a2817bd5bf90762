"""Checkpoint targets: split ROOT/NAME, open roots, and resolve latest, best, pointers and steps."""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

from ..errors import CorruptCheckpoint, FormatVersionError, NotFound
from ..format.manifest import Manifest, parse_manifest
from ..pointers import (
    BEST_POINTER_PREFIX,
    LATEST_POINTER,
    Pointer,
    is_pointer_key,
    list_pointer_keys,
    read_pointer,
)
from ..resolver import Resolver
from ..storage import Storage, open_storage
from .app import EXIT_USAGE, Failure

log = logging.getLogger("cloudckpt.cli")

_BUCKET_SCHEMES = ("s3", "gs", "gcs")


def split_target(target: str) -> tuple[str, str | None]:
    """``ROOT[/NAME]`` or ``ROOT@WHICH`` -> (root, which or None).

    A last component ending in ``.ckpt`` is a name; ``@`` in the last component chooses a
    checkpoint the one way every command understands: ``ROOT@latest``, ``ROOT@best``,
    ``ROOT@NAME``, ``ROOT@STEP``, ``ROOT@timeline:ID``.
    """
    head, at, choice = target.rpartition("@")
    if at and "/" not in choice.replace("timeline:", "") and head:
        return head, choice
    scheme = urlparse(target).scheme if "://" in target else ""
    if scheme in _BUCKET_SCHEMES:
        parsed = urlparse(target)
        head, _, last = parsed.path.rstrip("/").rpartition("/")
        if last.endswith(".ckpt"):
            return f"{scheme}://{parsed.netloc}{head}", last
        return target, None
    stripped = target.rstrip("/") or target
    head, sep, last = stripped.rpartition("/")
    if not last.endswith(".ckpt"):
        return target, None
    if not sep:
        return ".", last
    if head.endswith((":/", "://")) or head == "":
        head += "/"
    return head, last


def _local_path(url: str) -> Path:
    if url.startswith("file://"):
        return Path(unquote(urlparse(url).path))
    return Path(url).expanduser()


def open_root(url: str, endpoint_url: str | None = None, *, must_exist: bool = True) -> Storage:
    """Open a checkpoint root; bad URLs and missing local directories fail with one line."""
    scheme = urlparse(url).scheme if "://" in url else ""
    options: dict[str, Any] = {}
    if scheme in _BUCKET_SCHEMES:
        if endpoint_url:
            options["endpoint_url"] = endpoint_url
    elif scheme in ("", "file"):
        path = _local_path(url)
        if must_exist and not path.is_dir():
            raise Failure(f"{url}: no such directory" if not path.exists() else f"{url}: not a directory")
    elif scheme == "memory":
        raise Failure("memory:// stores live inside one process; the command line cannot open one",
                      EXIT_USAGE)
    else:
        raise Failure(f"unsupported storage URL {url!r}: use s3://BUCKET/PREFIX, gs://BUCKET/PREFIX, "
                      "file:///PATH or a local path", EXIT_USAGE)
    try:
        return open_storage(url, **options)
    except ValueError as exc:
        raise Failure(str(exc), EXIT_USAGE) from exc


def _read_pointer_or_none(store: Storage, key: str) -> Pointer | None:
    try:
        return read_pointer(store, key)
    except CorruptCheckpoint as exc:
        log.warning("%s", exc)
        return None


def pointers_of(store: Storage) -> dict[str, Pointer]:
    """Every readable pointer object: key -> pointer."""
    found = {}
    for key in list_pointer_keys(store):
        pointer = _read_pointer_or_none(store, key)
        if pointer is not None:
            found[key] = pointer
    return found


def _load(store: Storage, name: str) -> tuple[Manifest, bytes]:
    raw = store.get(name)
    return parse_manifest(raw, f"{store.url}/{name}"), raw


def _manifests(store: Storage, names: list[str]) -> dict[str, Manifest | Exception]:
    """Fetch and parse manifests in parallel; an unreadable one maps to its error."""

    def one(name: str) -> Manifest | Exception:
        try:
            return _load(store, name)[0]
        except (CorruptCheckpoint, FormatVersionError, NotFound) as exc:
            return exc

    with ThreadPoolExecutor(max_workers=8) as pool:
        return dict(zip(names, pool.map(one, names)))


def resolve(store: Storage, which: str | None, *, metric: str | None = None) -> str:
    """The key ``which`` stands for, by the library's one rule (:mod:`cloudckpt.resolver`):
    None/latest, best, a pointer, a step, a name, or ``timeline:ID``."""
    resolver = Resolver(store)
    monitor, mode = None, "min"
    choice: str | int = "latest" if which in (None, "latest", LATEST_POINTER) else which
    if choice == "best" or (isinstance(choice, str) and choice.startswith(BEST_POINTER_PREFIX)
                            and is_pointer_key(choice)):
        if choice != "best":
            pointer = read_pointer(store, choice)
            if pointer is None:
                raise NotFound(f"{store.url}/{choice}: no such best pointer")
            metric = pointer.metric
        try:
            monitor, mode = resolver.best_metric(metric)
        except ValueError as exc:
            raise Failure(f"{exc} with --metric", EXIT_USAGE) from exc
        choice = "best"
    elif isinstance(choice, str) and choice.isdigit():
        choice = int(choice)
    try:
        found = resolver.candidates(choice, monitor=monitor, mode=mode)
    except ValueError as exc:
        raise Failure(f"{exc}; or use latest, best, a step number or timeline:ID", EXIT_USAGE) from exc
    if not found:
        raise NotFound(f"{store.url}: no checkpoint here" if not resolver.catalog.names()
                       else f"{store.url}: no readable live checkpoint here")
    if isinstance(choice, str) and choice not in ("latest", "best") and not resolver_has(store, found[0]):
        raise NotFound(f"{store.url}/{choice}: no such checkpoint")
    return found[0]


def resolver_has(store: Storage, key: str) -> bool:
    try:
        store.head(key)
    except NotFound:
        return False
    return True


def _target(root_arg: str, name_arg: str | None) -> tuple[str, str | None]:
    root, name = split_target(root_arg)
    if name is not None and name_arg is not None:
        raise Failure(f"{root_arg} already names checkpoint {name}; drop the NAME argument ({name_arg})",
                      EXIT_USAGE)
    return root, name if name is not None else name_arg
