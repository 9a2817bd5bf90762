"""Retention policies: pure functions from checkpoint infos to the names to keep.

A policy never deletes anything itself; :mod:`cloudckpt.sweeper` does, after a
commit, and never removes what a pointer names.  Policies compose with ``|``
(keep the union).  Any callable ``(list[CheckpointInfo]) -> set[str]`` is a
policy too.

>>> from cloudckpt.catalog import CheckpointInfo
>>> import datetime as dt
>>> t = dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)
>>> infos = [CheckpointInfo(f"c{s}.ckpt", s, None, {"loss": 1 / s}, t, 0, "periodic") for s in range(1, 6)]
>>> sorted((KeepLastN(2) | KeepEvery(n_steps=2))(infos))
['c2.ckpt', 'c4.ckpt', 'c5.ckpt']
"""

from __future__ import annotations

import abc
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Sequence

if TYPE_CHECKING:
    from .catalog import CheckpointInfo

Infos = Sequence["CheckpointInfo"]


@dataclass(frozen=True)
class RetentionContext:
    """What a policy may need from the manager: the monitored metric and its direction."""

    monitor: str | None = None
    mode: str = "min"


class RetentionPolicy(abc.ABC):
    """Base of the built-in policies: ``keep`` returns the names to keep."""

    @abc.abstractmethod
    def keep(self, infos: Infos, context: RetentionContext) -> set[str]:
        """The names of ``infos`` this policy keeps."""

    def validate(self, context: RetentionContext) -> None:
        """Raise ValueError if the policy cannot work in ``context`` (checked when a manager is built)."""

    def __call__(self, infos: Infos, context: RetentionContext | None = None) -> set[str]:
        return self.keep(infos, context or RetentionContext())

    def __or__(self, other: "RetentionPolicy | Callable[[Infos], set[str]]") -> "RetentionPolicy":
        return AnyOf((self, as_policy(other)))

    def __ror__(self, other: Callable[[Infos], set[str]]) -> "RetentionPolicy":
        return AnyOf((as_policy(other), self))


def _newest_first(infos: Infos) -> list["CheckpointInfo"]:
    return sorted(infos, key=lambda i: (i.step, i.created), reverse=True)


@dataclass(frozen=True)
class KeepAll(RetentionPolicy):
    """Never delete anything."""

    def keep(self, infos: Infos, context: RetentionContext) -> set[str]:
        return {i.name for i in infos}


@dataclass(frozen=True)
class KeepLastN(RetentionPolicy):
    """Keep the ``n`` checkpoints with the highest steps (a rolling window)."""

    n: int

    def __post_init__(self) -> None:
        if self.n < 1:
            raise ValueError(f"KeepLastN needs n >= 1, got {self.n}")

    def keep(self, infos: Infos, context: RetentionContext) -> set[str]:
        return {i.name for i in _newest_first(infos)[: self.n]}


@dataclass(frozen=True)
class KeepBestK(RetentionPolicy):
    """Keep the ``k`` best checkpoints by a metric (the manager's ``monitor``/``mode`` unless given).

    Ties keep the earlier checkpoint; checkpoints without the metric, or with NaN, never count.
    """

    k: int
    monitor: str | None = None
    mode: str | None = None

    def __post_init__(self) -> None:
        if self.k < 1:
            raise ValueError(f"KeepBestK needs k >= 1, got {self.k}")
        if self.mode not in (None, "min", "max"):
            raise ValueError(f"KeepBestK mode must be 'min' or 'max', got {self.mode!r}")

    def validate(self, context: RetentionContext) -> None:
        self._metric(context)

    def keep(self, infos: Infos, context: RetentionContext) -> set[str]:
        return {i.name for i in best_first(infos, self._metric(context), self.mode or context.mode)[: self.k]}

    def _metric(self, context: RetentionContext) -> str:
        metric = self.monitor or context.monitor
        if metric is None:
            raise ValueError("KeepBestK needs a metric: KeepBestK(k, monitor='val_loss') or a manager monitor")
        return metric


def best_first(infos: Infos, metric: str, mode: str) -> list["CheckpointInfo"]:
    """Checkpoints that have a finite-or-infinite (not NaN) ``metric``, best first, ties by earlier step."""
    scored = [i for i in infos if i.metrics.get(metric) is not None and not math.isnan(i.metrics[metric])]
    sign = 1.0 if mode == "min" else -1.0
    return sorted(scored, key=lambda i: (sign * i.metrics[metric], i.step, i.created))


@dataclass(frozen=True)
class KeepBestAndLatest(RetentionPolicy):
    """Keep the single best checkpoint and the single newest one."""

    monitor: str | None = None
    mode: str | None = None

    def validate(self, context: RetentionContext) -> None:
        KeepBestK(1, self.monitor, self.mode).validate(context)

    def keep(self, infos: Infos, context: RetentionContext) -> set[str]:
        return (KeepLastN(1) | KeepBestK(1, self.monitor, self.mode)).keep(infos, context)


@dataclass(frozen=True)
class KeepEvery(RetentionPolicy):
    """Keep checkpoints whose step is a multiple of ``n_steps`` (milestones), or whose epoch is
    a multiple of ``n_epochs``."""

    n_steps: int | None = None
    n_epochs: int | None = None

    def __post_init__(self) -> None:
        if (self.n_steps is None) == (self.n_epochs is None):
            raise ValueError("KeepEvery needs exactly one of n_steps= or n_epochs=")
        if (self.n_steps or self.n_epochs or 0) < 1:
            raise ValueError("KeepEvery's interval must be >= 1")

    def keep(self, infos: Infos, context: RetentionContext) -> set[str]:
        if self.n_steps is not None:
            return {i.name for i in infos if i.step % self.n_steps == 0}
        assert self.n_epochs is not None
        return {i.name for i in infos if i.epoch is not None and i.epoch % self.n_epochs == 0}


@dataclass(frozen=True)
class KeepSuperseded(RetentionPolicy):
    """Keep superseded checkpoints (those of abandoned timelines) for ``days`` after they were
    superseded, then remove them.  Without this policy they are kept until
    ``cloudckpt gc --superseded``.  It says nothing about live checkpoints: alone it keeps them
    all, and combined (``KeepLastN(3) | KeepSuperseded(days=7)``) the other policies decide.
    """

    days: float

    def __post_init__(self) -> None:
        if not isinstance(self.days, (int, float)) or isinstance(self.days, bool) or self.days < 0:
            raise ValueError(f"KeepSuperseded needs days >= 0, got {self.days!r}")

    def keep(self, infos: Infos, context: RetentionContext) -> set[str]:
        return {i.name for i in infos}


def superseded_days(policy: "RetentionPolicy | None") -> float | None:
    """The ``days`` of the KeepSuperseded in ``policy`` (the longest if several), or None."""
    if isinstance(policy, KeepSuperseded):
        return float(policy.days)
    if isinstance(policy, AnyOf):
        found = [d for d in (superseded_days(p) for p in policy.policies) if d is not None]
        return max(found) if found else None
    return None


@dataclass(frozen=True)
class AnyOf(RetentionPolicy):
    """Keep what any of ``policies`` keeps (what ``a | b`` builds)."""

    policies: tuple[RetentionPolicy, ...]

    def validate(self, context: RetentionContext) -> None:
        for policy in self.policies:
            policy.validate(context)

    def keep(self, infos: Infos, context: RetentionContext) -> set[str]:
        deciding = [p for p in self.policies if not isinstance(p, KeepSuperseded)] or self.policies
        kept: set[str] = set()
        for policy in deciding:
            kept |= policy.keep(infos, context)
        return kept

    def __or__(self, other):
        return AnyOf(self.policies + (as_policy(other),))


@dataclass(frozen=True)
class Custom(RetentionPolicy):
    """Wraps a user's callable ``(list[CheckpointInfo]) -> set[str]``."""

    fn: Callable[[Infos], set[str]]

    def keep(self, infos: Infos, context: RetentionContext) -> set[str]:
        kept = self.fn(list(infos))
        if not isinstance(kept, (set, frozenset, list, tuple)):
            raise TypeError(f"retention callable {self.fn!r} must return a set of names, got {type(kept).__name__}")
        unknown = set(kept) - {i.name for i in infos}
        if unknown:
            raise ValueError(f"retention callable {self.fn!r} returned unknown names {sorted(unknown)}")
        return set(kept)


def as_policy(policy: RetentionPolicy | Callable[[Infos], set[str]] | None) -> RetentionPolicy:
    """A policy from a policy, a callable, or None (keep all)."""
    if policy is None:
        return KeepAll()
    if isinstance(policy, RetentionPolicy):
        return policy
    if callable(policy):
        return Custom(policy)
    raise TypeError(f"retention must be a policy or a callable returning names to keep, got {policy!r}")


def rolling_window(keep_last_n: int | None, retention: RetentionPolicy | Callable[[Infos], set[str]] | None,
                   *, keep_best: bool) -> RetentionPolicy | Callable[[Infos], set[str]] | None:
    """The policy that callbacks' ``keep_last_n=N`` means: the newest N, plus the best when tracked.

    ``retention`` passes through when ``keep_last_n`` is None; giving both is an error.
    """
    if keep_last_n is None:
        return retention
    if retention is not None:
        raise ValueError("give keep_last_n or retention, not both")
    if not isinstance(keep_last_n, int) or isinstance(keep_last_n, bool) or keep_last_n < 1:
        raise ValueError(f"keep_last_n must be a positive integer or None, got {keep_last_n!r}")
    return KeepLastN(keep_last_n) | KeepBestK(1) if keep_best else KeepLastN(keep_last_n)
