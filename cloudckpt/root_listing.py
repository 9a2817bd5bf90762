"""One listing of a root, taken once per save and shared by everything the save does after it.

A steady-state save with retention needs to know the committed manifests (dedup, the live
checkpoints, retention), the pointers that exist, the superseded manifests and the chunks (the
sweep).  Each used to list its own part of the root; a :class:`RootListing` is one LIST
(recursive when the save will prune, one level otherwise) that answers all of them.

A listing is a moment in the past.  Everything that uses one is safe with a listing taken
before the upload, because of how the root changes:

* a manifest committed after the listing is not seen, so nothing of it is removed: retention
  only removes listed checkpoints, and the chunks it uploaded are not listed (or younger than
  the sweeper's grace period), the chunks it reused were referenced when its writer listed, so
  they were first seen unreferenced less than a save ago (the grace period exceeds any save);
* ``S3``, GCS and the local store list keys in order, and a manifest that moves under
  ``superseded/`` is copied before it is deleted, so a listing sees it in at least one place.
"""

from __future__ import annotations

from dataclasses import dataclass

from .storage.base import ObjectInfo, Storage


@dataclass(frozen=True)
class RootListing:
    """The objects of a root as one LIST saw them; ``recursive`` False: the top level only."""

    objects: dict[str, ObjectInfo]
    recursive: bool

    @classmethod
    def take(cls, store: Storage, *, recursive: bool) -> "RootListing":
        """List ``store`` now: the whole root (``recursive``) or its top level, in one LIST."""
        return cls({i.key: i for i in store.list("", recursive=recursive)}, recursive)

    def covers(self, key: str) -> bool:
        """Whether this listing would show ``key`` if it existed."""
        return self.recursive or "/" not in key

    def top(self) -> list[ObjectInfo]:
        """The objects at the top of the root, by key."""
        return [i for k, i in sorted(self.objects.items()) if "/" not in k]

    def under(self, prefix: str) -> list[ObjectInfo]:
        """The objects whose key starts with ``prefix`` (``prefix`` must end with ``/``), by key."""
        if not self.recursive:
            raise ValueError(f"a one-level listing does not show what is under {prefix!r}")
        return [i for k, i in sorted(self.objects.items()) if k.startswith(prefix)]

    def with_object(self, info: ObjectInfo) -> "RootListing":
        """This listing plus ``info`` (an object this process just wrote)."""
        return RootListing({**self.objects, info.key: info}, self.recursive)
