"""Where a DCP checkpoint lives: the store the writer and the reader of one checkpoint location share."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any, TypeVar

from ..storage import Storage, open_storage

_SCHEMES = ("s3://", "gs://", "gcs://", "file://", "memory://")


class Location:
    """The store a checkpoint lives in: a URL this object opened (and closes), or a caller's Storage."""

    def __init__(self, root_or_store: str | os.PathLike[str] | Storage,
                 storage_options: Mapping[str, Any] | None) -> None:
        self.options = dict(storage_options or {})
        self.given: Storage | None = None
        self.owned: Storage | None = None
        if isinstance(root_or_store, Storage):
            if self.options:
                raise TypeError("storage_options apply only when the checkpoint is given as a URL or path")
            self.given = root_or_store
        else:
            self.owned = open_storage(root_or_store, **self.options)

    @property
    def store(self) -> Storage:
        store = self.given or self.owned
        assert store is not None
        return store

    def reset(self, checkpoint_id: str | os.PathLike[str] | None) -> None:
        if checkpoint_id is None or (self.owned is not None and str(checkpoint_id) == self.owned.url):
            return
        if self.given is not None:
            raise ValueError(
                f"this DCP storage object was built on {self.given!r}, a Storage object, so it cannot move to "
                f"checkpoint_id={str(checkpoint_id)!r}; build one per checkpoint, or build it from a URL")
        new = open_storage(checkpoint_id, **self.options)
        if self.owned is not None:
            self.owned.close()
        self.owned = new

    def close(self) -> None:
        if self.owned is not None:
            self.owned.close()
            self.owned = None


def validate_checkpoint_id(checkpoint_id: str | os.PathLike[str]) -> bool:
    return str(checkpoint_id).startswith(_SCHEMES)


_L = TypeVar("_L", bound="AtLocation")


class AtLocation:
    """What the writer and the reader share: the store of one checkpoint location."""

    _location: Location

    @property
    def store(self) -> Storage:
        return self._location.store

    @property
    def checkpoint_id(self) -> str:
        """The URL of the checkpoint."""
        return self.store.url

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: str | os.PathLike[str]) -> bool:
        return validate_checkpoint_id(checkpoint_id)

    def close(self) -> None:
        self._location.close()

    def __enter__(self: _L) -> _L:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
