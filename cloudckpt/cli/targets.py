"""Checkpoint targets: split ROOT/NAME, open roots, and resolve latest, best, pointers and steps."""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

from ..copy import manifest_names
from ..errors import CorruptCheckpoint, FormatVersionError, NotFound
from ..format.manifest import Manifest, check_manifest_name, parse_manifest
from ..pointers import (
    BEST_POINTER_PREFIX,
    LATEST_POINTER,
    Pointer,
    best_pointer_key,
    is_pointer_key,
    list_pointer_keys,
    read_pointer,
)
from ..storage import Storage, open_storage
from .app import EXIT_USAGE, Failure

log = logging.getLogger("cloudckpt.cli")

_BUCKET_SCHEMES = ("s3", "gs", "gcs")


def split_target(target: str) -> tuple[str, str | None]:
    """``ROOT[/NAME]`` -> (root, name or None): a last component ending in ``.ckpt`` is a name."""
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
    """The checkpoint name ``which`` stands for: None/latest, best, a pointer, a step or a name."""
    names = manifest_names(store)
    if which in (None, "latest", LATEST_POINTER):
        pointer = _read_pointer_or_none(store, LATEST_POINTER)
        if pointer is not None and pointer.target in names:
            return pointer.target
        readable = [m for m in _manifests(store, names).values() if isinstance(m, Manifest)]
        if not readable:
            raise NotFound(f"{store.url}: no checkpoint here" if not names
                           else f"{store.url}: no readable checkpoint here")
        return max(readable, key=lambda m: (m.step, m.created)).name
    if which == "best" or (which.startswith(BEST_POINTER_PREFIX) and is_pointer_key(which)):
        key = which if which != "best" else _best_key(store, metric)
        pointer = read_pointer(store, key)
        if pointer is None:
            raise NotFound(f"{store.url}/{key}: no such best pointer")
        if pointer.target not in names:
            raise NotFound(f"{store.url}/{key} names {pointer.target}, which does not exist")
        return pointer.target
    if which.isdigit():
        step = int(which)
        matching = [m for m in _manifests(store, names).values() if isinstance(m, Manifest) and m.step == step]
        if not matching:
            raise NotFound(f"{store.url}: no checkpoint of step {step}")
        return max(matching, key=lambda m: m.created).name
    try:
        check_manifest_name(which)
    except ValueError as exc:
        raise Failure(f"{exc}; or use latest, best or a step number", EXIT_USAGE) from exc
    if which not in names:
        raise NotFound(f"{store.url}/{which}: no such checkpoint")
    return which


def _best_key(store: Storage, metric: str | None) -> str:
    if metric:
        return best_pointer_key(metric)
    keys = list_pointer_keys(store)[1:]
    if len(keys) == 1:
        return keys[0]
    if not keys:
        raise NotFound(f"{store.url}: no best pointer here")
    raise Failure(f"{store.url} has several best pointers ({', '.join(keys)}); choose one with --metric",
                  EXIT_USAGE)


def _target(root_arg: str, name_arg: str | None) -> tuple[str, str | None]:
    root, name = split_target(root_arg)
    if name is not None and name_arg is not None:
        raise Failure(f"{root_arg} already names checkpoint {name}; drop the NAME argument ({name_arg})",
                      EXIT_USAGE)
    return root, name if name is not None else name_arg
