"""Run contenders side by side, interleaved, each save into a fresh location; check every restore."""

from __future__ import annotations

import logging
import shutil
from typing import Callable

import torch

from .contenders import Contender
from .measure import Result, measure
from .workload import Workload

log = logging.getLogger("bench")


def _fingerprint(work: Workload) -> torch.Tensor:
    return next(work.model.parameters()).detach().clone()


def _scramble(work: Workload) -> None:
    with torch.no_grad():
        next(work.model.parameters()).zero_()


def compare(
    setting: str,
    contenders: list[Contender],
    work: Workload,
    where: Callable[[Contender, int], str],
    *,
    repeats: int,
    server_pids: tuple[int, ...] = (),
    cleanup: Callable[[str], None] | None = None,
) -> tuple[list[Result], dict[str, str]]:
    """Save and restore ``work`` with every contender, round-robin, ``repeats`` times.

    Each save goes to ``where(contender, repeat)`` (a fresh location); each
    restore reads it back into the live objects, which were scrambled first,
    and is checked.  Returns the results and, per contender that could not
    run, why.
    """
    skipped: dict[str, str] = {}
    results: dict[str, tuple[Result, Result]] = {}
    for contender in contenders:
        reason = contender.why_not()
        if reason:
            skipped[contender.name] = reason
            log.warning("%s / %s cannot run: %s", setting, contender.name, reason)
            continue
        nbytes = contender.nbytes(work)
        results[contender.name] = (Result(setting, contender.name, "save", nbytes, note=contender.note),
                                   Result(setting, contender.name, "restore", nbytes, note=contender.note))
    for repeat in range(repeats):
        for contender in contenders:
            if contender.name not in results or contender.name in skipped:
                continue
            save, restore = results[contender.name]
            target = where(contender, repeat)
            expected = _fingerprint(work)
            try:
                save.samples.append(measure(lambda: contender.save(work, target), server_pids))
                _scramble(work)
                restore.samples.append(measure(lambda: contender.restore(work, target), server_pids))
                if not torch.equal(_fingerprint(work), expected):
                    raise AssertionError("the restored weights differ from the saved ones")
            except (KeyboardInterrupt, SystemExit):
                raise
            except BaseException as exc:  # report (DCP raises BaseExceptions), let the others run
                skipped[contender.name] = f"failed: {type(exc).__name__}: {str(exc)[:300]}"
                log.warning("%s / %s failed: %s", setting, contender.name, exc)
                with torch.no_grad():
                    next(work.model.parameters()).copy_(expected)
            finally:
                if cleanup is not None:
                    cleanup(target)
            log.info("%s / %s repeat %d done", setting, contender.name, repeat + 1)
    out = [r for pair in results.values() for r in pair if r.samples and r.contender not in skipped]
    return out, skipped


def remove_tree(path: str) -> None:
    shutil.rmtree(path, ignore_errors=True)
