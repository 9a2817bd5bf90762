"""The one exception tree of cloudckpt.

Every backend translates its SDK's errors into these at its edge, so callers
handle storage failures the same way on S3, GCS, local disk and memory.
Only :class:`TransientError` is ever retried.
"""

from __future__ import annotations


class CloudCkptError(Exception):
    """Base class of every error cloudckpt raises on purpose."""


class NotFound(CloudCkptError, FileNotFoundError):
    """An object, checkpoint or bucket does not exist."""


class AlreadyExists(CloudCkptError, FileExistsError):
    """A create-only write found the key already present; the stored bytes are untouched."""


class CheckpointExists(AlreadyExists):
    """A save found its name already committed on the live timeline with a different state."""


class LostRace(AlreadyExists):
    """On a store that ignores create-only writes (single-writer mode), another writer replaced the
    manifest this save had just committed: the save is lost and the other checkpoint stands."""


class TimelineSuperseded(CloudCkptError):
    """This writer's timeline was abandoned (a rollback, or a restore and save elsewhere): its
    saves could never become ``latest``, so they are refused."""


class PreconditionFailed(CloudCkptError):
    """A compare-and-swap write found the object changed since it was read."""


class PermissionDenied(CloudCkptError, PermissionError):
    """The credentials in use may not perform the operation (HTTP 401/403)."""


class TransientError(CloudCkptError):
    """A failure that may succeed when tried again (throttling, 5xx, resets, timeouts)."""


class EndpointUnreachable(TransientError):
    """Nothing accepts connections at the store's endpoint (refused, or the name does not resolve).

    Retried only briefly (``RetryPolicy.unreachable_attempts``): it is almost always a wrong
    endpoint or a service that is not running, not a passing condition.
    """


class CorruptCheckpoint(CloudCkptError):
    """Stored bytes fail verification: checksum mismatch, truncation or a malformed manifest."""


class FormatVersionError(CloudCkptError):
    """A manifest was written by a format version this release cannot read."""


class InvalidKey(CloudCkptError, ValueError):
    """A storage key is malformed (``..``, absolute, empty segments)."""


class SimulatedCrash(BaseException):
    """Raised by the fault-injecting storage to stand for the process dying.

    It derives from ``BaseException`` so that ``except Exception`` blocks in
    the code under test cannot swallow it, just as they could not stop a kill.
    """


class PartialRestore(CloudCkptError):
    """A restore failed after it had begun writing the live tensors (only possible above the staging
    budget, in the second read of a checkpoint that had verified completely); the live state is a mix."""
