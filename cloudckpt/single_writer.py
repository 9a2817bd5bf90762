"""Single-writer mode: the checks that stand in for conditional writes the store ignores.

On a store accepted with ``conditional_writes="unsupported"`` (see
:mod:`cloudckpt.storage.capabilities`), a create-only write and a compare-and-swap are plain
overwrites.  With one writer per root nothing depends on them.  If a second writer appears
anyway, these checks find the lost race *after the fact*:

* before a manifest commit, the name is looked up (a HEAD): an existing checkpoint is never
  overwritten knowingly;
* after a manifest, pointer or run-index write, the object is read back: if it holds other
  bytes, another process wrote in between, and this is logged as an ERROR.  A pointer or the
  index is then re-read and the change re-applied (forward only); a replaced manifest fails
  the save with :class:`~cloudckpt.errors.AlreadyExists`.

On every other store each function returns at once, without a request.
"""

from __future__ import annotations

import logging

from .errors import AlreadyExists, NotFound
from .storage.base import Buffer, Storage

log = logging.getLogger(__name__)


def active(store: Storage) -> bool:
    """Whether ``store`` was accepted in single-writer mode."""
    caps = getattr(store, "capabilities", None)
    return bool(caps is not None and caps.single_writer)


def refuse_if_taken(store: Storage, key: str) -> None:
    """Raise AlreadyExists if ``key`` exists (what the store's create-only write would do)."""
    if not active(store):
        return
    try:
        store.head(key)
    except NotFound:
        return
    raise AlreadyExists(f"{store.url}/{key} already exists (checked before writing: this store ignores "
                        "create-only writes); it was left as it is")


def confirmed(store: Storage, key: str, data: Buffer, what: str) -> bool:
    """Whether ``key`` still holds ``data`` right after we wrote it; logs a lost race if not."""
    if not active(store):
        return True
    try:
        stored: bytes | None = store.get(key)
    except NotFound:
        stored = None
    if stored == bytes(data):
        return True
    log.error(
        "LOST RACE on %s/%s: another process wrote %s between this writer's read and its write "
        "(the store ignores conditional writes; single-writer mode). %s",
        store.url, key, "or deleted it" if stored is None else "it", what,
    )
    return False
