"""What a save does around its commit without ever failing a committed checkpoint.

* :func:`check_manager_config` refuses, when the manager is built, settings that would
  otherwise only fail inside a later ``save()`` (after its commit).
* :func:`run_after_commit` runs the steps that follow a commit (pointers, the run
  index, retention): a failure is logged and returned as a problem on the save's
  :class:`~cloudckpt.catalog.CheckpointInfo`, never raised; the checkpoint is committed
  and the next save tries the steps again.

A retried save of a checkpoint that is already committed is a no-op
(:func:`cloudckpt.writer.commit_manifest`).
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Sequence

from .retention import RetentionContext, RetentionPolicy
from .sweeper import SweepConfig
from .transfer import TransferConfig

log = logging.getLogger(__name__)


def check_manager_config(*, monitor: Any, mode: str, retention: RetentionPolicy | None,
                         cleanup: Any, transfer: Any, top_k: Any) -> None:
    """Raise TypeError / ValueError for a manager setting that cannot work."""
    if monitor is not None and not isinstance(monitor, str):
        raise TypeError(f"monitor must be a metric name (str) or None, got {monitor!r}")
    if cleanup is not None and not isinstance(cleanup, SweepConfig):
        raise TypeError(f"cleanup must be a SweepConfig or None, got {type(cleanup).__name__}")
    if transfer is not None and not isinstance(transfer, TransferConfig):
        raise TypeError(f"transfer must be a TransferConfig or None, got {type(transfer).__name__}")
    if not isinstance(top_k, int) or isinstance(top_k, bool) or top_k < 1:
        raise ValueError(f"top_k must be a positive integer, got {top_k!r}")
    if retention is not None:
        retention.validate(RetentionContext(monitor, mode))


def run_after_commit(name: str, steps: Sequence[tuple[str, Callable[[], object]]]) -> tuple[str, ...]:
    """Run every step; return one line per step that failed (each is logged, none is raised).

    Only ``Exception`` is caught: a ``BaseException`` (an interrupt, a simulated crash) still
    stops the process, which the crash model covers.
    """
    problems = []
    for what, step in steps:
        try:
            step()
        except Exception as exc:  # the checkpoint is committed: report, do not fail the save
            problems.append(report_failure(name, what, exc))
    return tuple(problems)


def report_failure(name: str, what: str, exc: Exception) -> str:
    """Log one step that failed after the commit of ``name``; return the line for ``problems``."""
    problem = f"{what} after the commit of {name} failed ({type(exc).__name__}: {exc})"
    log.error("%s; the checkpoint is saved, and the next save tries again", problem)
    return problem
