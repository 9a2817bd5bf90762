"""Commands that change a root: ``promote`` (force a pointer, pin) and ``gc`` (retention and sweeping)."""

from __future__ import annotations

import datetime as _dt
import math
from typing import Any

import click

from ..format.manifest import Manifest
from ..pointers import LATEST_POINTER, Pointer, best_pointer_key, force_pointer
from ..storage import Storage
from .app import EXIT_USAGE, Failure, _common, cli
from .render import _Duration, _fmt_duration, _pointer_label, emit_json, human_bytes
from .targets import _load, _read_pointer_or_none, _target, open_root, resolve


# -- promote ------------------------------------------------------------------------------
@cli.command("promote")
@click.argument("target", metavar="ROOT/NAME")
@click.argument("name", required=False)
@click.option("--metric", help="Point best_model_<METRIC>.ckpt at this checkpoint (value from its metrics).")
@click.option("--mode", type=click.Choice(["min", "max"]),
              help="Direction of METRIC (default: the current pointer's, else min).")
@click.option("--latest", "latest", is_flag=True,
              help="Make it the resume point: the same as `cloudckpt rollback ROOT NAME` (a new timeline).")
@click.option("--pin/--unpin", "pin", default=None, help="Pin (or unpin) it: retention never removes a pinned one.")
@_common
def promote_cmd(target: str, name: str | None, metric: str | None, mode: str | None, latest: bool,
                pin: bool | None, endpoint_url: str | None, as_json: bool) -> None:
    """Point the best pointer at a checkpoint, and/or pin it; --latest rolls back to it.

    This is an operator decision: it FORCES the best pointer to this checkpoint even when the
    one it names now is better, overriding the forward-only rule savers obey.  Running
    trainers keep moving the pointer forward from here when they beat it.  --latest is
    `cloudckpt rollback`: later checkpoints are superseded and a new timeline starts here.
    """
    from ..manager import CheckpointManager

    root, which = _target(target, name)
    if which is None:
        raise Failure("name the checkpoint to promote: ROOT/NAME.ckpt or ROOT NAME", EXIT_USAGE)
    if metric is None and not latest and pin is None:
        raise Failure("nothing to do: give --metric M, --latest, --pin or --unpin", EXIT_USAGE)
    store = open_root(root, endpoint_url)
    changes: list[dict[str, Any]] = []
    with store:
        resolved = resolve(store, which)
        manifest, _ = _load(store, resolved)
        if metric is not None:
            changes.append(_force_best(store, manifest, metric, mode))
        if latest:
            before = CheckpointManager(store, capture_rng=False).latest()
            report = CheckpointManager(store, capture_rng=False).rollback(resolved)
            changes.append({"pointer": LATEST_POINTER, "before": before.name if before else None,
                            "changed": True, "superseded": [m.name for m in report.superseded],
                            "timeline": report.timeline})
        if pin is not None:
            CheckpointManager(store, capture_rng=False).pin(resolved, pinned=pin)
            changes.append({"pin": pin})
    if as_json:
        emit_json({"root": store.url, "name": resolved, "changes": changes})
        return
    for change in changes:
        if "pin" in change:
            click.echo(f"{'pinned' if change['pin'] else 'unpinned'} {resolved}")
        else:
            before = change["before"] or "nothing"
            click.echo(f"{_pointer_label(change['pointer'])}: {before} -> {resolved}"
                       + ("" if change["changed"] else " (already there)"))


def _force_best(store: Storage, manifest: Manifest, metric: str, mode: str | None) -> dict[str, Any]:
    if metric not in manifest.metrics:
        have = ", ".join(sorted(manifest.metrics)) or "none"
        raise Failure(f"{store.url}/{manifest.name} has no metric {metric!r} (it has: {have})")
    value = manifest.metrics[metric]
    if value is None or math.isnan(value):
        raise Failure(f"{store.url}/{manifest.name}: metric {metric!r} is {value}; it cannot be the best")
    key = best_pointer_key(metric)
    if mode is None:
        current = _read_pointer_or_none(store, key)
        mode = current.mode if current is not None and current.mode else "min"
    return _force(store, key, Pointer(manifest.name, manifest.step, metric, value, mode))


def _force(store: Storage, key: str, pointer: Pointer) -> dict[str, Any]:
    """Compare-and-swap ``key`` to ``pointer`` whatever it names now."""
    before, changed = force_pointer(store, key, pointer)
    return {"pointer": key, "before": before, "changed": changed}


# -- gc ------------------------------------------------------------------------------------
@cli.command("gc")
@click.argument("root")
@click.option("--yes", is_flag=True, help="Act. Without it, only report what would be done.")
@click.option("--keep-last", type=click.IntRange(min=1), metavar="N", help="Keep the N newest checkpoints.")
@click.option("--keep-best", type=click.IntRange(min=1), metavar="K", help="Keep the K best by --metric.")
@click.option("--metric", help="Metric for --keep-best.")
@click.option("--mode", type=click.Choice(["min", "max"]), default="min", show_default=True)
@click.option("--cleanup", type=click.Choice(["delete", "lifecycle"]), default="delete", show_default=True,
              help="Delete unreferenced chunks, or mark them for the bucket's lifecycle rule.")
@click.option("--grace", type=_Duration(), default="6h", show_default=True,
              help="Leave unreferenced chunks younger than this (a writer may be about to commit them).")
@click.option("--upload-age", type=_Duration(), default="1d", show_default=True,
              help="Abort multipart uploads started longer ago than this.")
@click.option("--superseded", "superseded_age", type=_Duration(), default=None, is_flag=False, flag_value="0",
              metavar="[AGE]", help="Also remove superseded checkpoints (of abandoned timelines), or only "
                                    "those superseded longer ago than AGE (--superseded=7d).")
@_common
def gc_cmd(root: str, yes: bool, keep_last: int | None, keep_best: int | None, metric: str | None, mode: str,
           cleanup: str, grace: _dt.timedelta, upload_age: _dt.timedelta, superseded_age: _dt.timedelta | None,
           endpoint_url: str | None, as_json: bool) -> None:
    """Remove checkpoints the retention options do not keep, and sweep unreferenced chunks.

    A dry run unless --yes.  Without --keep-last/--keep-best every checkpoint is kept and only
    garbage (chunks of failed saves, chunks only quarantined manifests used, stale multipart
    uploads) is cleaned.  Checkpoints latest or best resolve to, and pinned ones, are always
    kept.  Superseded checkpoints are kept unless --superseded is given.
    """
    from ..manager import CheckpointManager
    from ..retention import KeepBestK, KeepLastN, KeepSuperseded, RetentionPolicy
    from ..sweeper import SweepConfig

    if keep_best is not None and not metric:
        raise Failure("--keep-best needs --metric (and --mode if higher is better)", EXIT_USAGE)
    policies = ([KeepLastN(keep_last)] if keep_last else []) + ([KeepBestK(keep_best)] if keep_best else [])
    if superseded_age is not None:
        policies.append(KeepSuperseded(days=superseded_age.total_seconds() / 86400))
    policy: RetentionPolicy | None = None
    for p in policies:
        policy = p if policy is None else policy | p
    store = open_root(root, endpoint_url)
    config = SweepConfig(cleanup=cleanup, grace=grace, stale_upload_age=upload_age)  # type: ignore[arg-type]
    with store:
        mgr = CheckpointManager(store, monitor=metric, mode=mode,  # type: ignore[arg-type]
                                retention=policy, cleanup=config, capture_rng=False)
        infos = {i.name: i for i in mgr.list()}
        infos.update({f"superseded/{i.timeline}/{i.name}": i for i in mgr.list(superseded=True) if i.superseded})
        pinned = mgr.pinned()
        report = mgr.prune(dry_run=not yes)
    removed = report.checkpoints_removed
    kept = [i for n, i in infos.items() if n not in removed]
    if as_json:
        emit_json({
            "root": store.url, "dry_run": report.dry_run, "cleanup": report.cleanup,
            "checkpoints_removed": [{"name": n, "step": infos[n].step if n in infos else None,
                                     "nbytes": infos[n].nbytes if n in infos else None} for n in removed],
            "checkpoints_kept": [{"name": i.name, "pointers": list(i.pointers), "pinned": i.name in pinned}
                                 for i in kept],
            "chunks_removed": report.chunks_removed, "bytes_removed": report.bytes_removed,
            "chunks_too_young": report.chunks_too_young, "uploads_aborted": report.uploads_aborted,
            "grace_seconds": grace.total_seconds(),
        })
        return
    would = "would " if report.dry_run else ""
    verb = {"delete": "delete", "lifecycle": "mark for lifecycle expiry"}[report.cleanup]
    verb_done = {"delete": "deleted", "lifecycle": "marked for lifecycle expiry"}[report.cleanup]
    click.echo(f"{'would remove' if report.dry_run else 'removed'} {len(removed)} checkpoint(s)"
               + (":" if removed else ""))
    for n in removed:
        info = infos.get(n)
        click.echo(f"  {n}" + (f"  step {info.step}  {human_bytes(info.nbytes)}" if info else ""))
    click.echo(f"kept {len(kept)} checkpoint(s)" + (":" if kept else ""))
    for info in kept:
        why = [_pointer_label(p) for p in info.pointers] + (["pinned"] if info.name in pinned else [])
        click.echo(f"  {info.name}" + (f"  ({', '.join(why)})" if why else ""))
    click.echo(f"{would + verb if report.dry_run else verb_done} {report.chunks_removed} unreferenced chunk(s) "
               f"({human_bytes(report.bytes_removed)})")
    if report.chunks_too_young:
        click.echo(f"{'would leave' if report.dry_run else 'left'} {report.chunks_too_young} unreferenced "
                   f"chunk(s) younger than the grace period ({_fmt_duration(grace)}); a later gc removes them")
    click.echo(f"{would}abort {report.uploads_aborted} stale multipart upload(s)" if report.dry_run
               else f"aborted {report.uploads_aborted} stale multipart upload(s)")
    if report.dry_run:
        click.echo("dry run: nothing was changed; run again with --yes to apply", err=True)
