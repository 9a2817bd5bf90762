"""Commands that change a root's history: ``rollback`` (fork at an earlier checkpoint) and
``quarantine`` (move a damaged manifest or a stray object aside)."""

from __future__ import annotations

import click

from .app import EXIT_USAGE, Failure, _common, cli
from .render import emit_json
from .targets import _target, open_root, resolve


@cli.command("rollback")
@click.argument("target", metavar="ROOT[@NAME|@STEP]")
@click.argument("name", required=False)
@click.option("--dry-run", is_flag=True, help="Only show what would be superseded.")
@_common
def rollback_cmd(target: str, name: str | None, dry_run: bool, endpoint_url: str | None, as_json: bool) -> None:
    """Make checkpoint NAME the resume point of the run: a new timeline starts there.

    Every live checkpoint after NAME is superseded: kept under superseded/ (restorable by
    name, listed by `cloudckpt ls`), but never latest or best, and its name is free again.
    latest then resolves to NAME, and the next job resumes from it.  Writers still running on
    the old timeline can no longer save.  Superseded checkpoints go only by
    `cloudckpt gc --superseded` or a KeepSuperseded(days=N) policy.
    """
    from ..manager import CheckpointManager

    root, which = _target(target, name)
    if which is None or which in ("latest", "best"):
        raise Failure("name the checkpoint to roll back to: ROOT@NAME, ROOT@STEP or ROOT NAME", EXIT_USAGE)
    store = open_root(root, endpoint_url)
    with store:
        key = resolve(store, which)
        report = CheckpointManager(store, capture_rng=False).rollback(key, dry_run=dry_run)
    if as_json:
        emit_json({"root": store.url, "dry_run": dry_run, "to": report.target.name, "step": report.target.step,
                   "timeline": report.timeline,
                   "superseded": [{"name": m.name, "step": m.step, "timeline": m.lineage.timeline}
                                  for m in report.superseded]})
        return
    verb = "would supersede" if dry_run else "superseded"
    head = (f"would roll back to {report.target.name} (step {report.target.step})" if dry_run else
            f"rolled back to {report.target.name} (step {report.target.step}): new timeline {report.timeline}")
    click.echo(head)
    click.echo(f"{verb} {len(report.superseded)} checkpoint(s)" + (" (kept under superseded/):" if
                                                                     report.superseded else ""))
    for m in sorted(report.superseded, key=lambda m: m.step):
        click.echo(f"  {m.name}  step {m.step}")
    if dry_run:
        click.echo("dry run: nothing was changed", err=True)


@cli.command("quarantine")
@click.argument("root")
@click.argument("name")
@click.option("--reason", default="quarantined by hand", show_default=True, help="Why; kept in reason.json.")
@_common
def quarantine_cmd(root: str, name: str, reason: str, endpoint_url: str | None, as_json: bool) -> None:
    """Move the object NAME at the top of ROOT under quarantine/ with a reason.

    For a damaged manifest or a stray *.ckpt object that is not a checkpoint: restore skips
    it, its name is free for a later save, and `cloudckpt gc` sweeps the chunks only it used.
    """
    from ..manager import CheckpointManager

    store = open_root(root, endpoint_url)
    with store:
        key = CheckpointManager(store, capture_rng=False).quarantine(name, reason)
    if key is None:
        raise Failure(f"{store.url}/{name}: no such object")
    if as_json:
        emit_json({"root": store.url, "name": name, "key": key, "reason": reason})
    else:
        click.echo(f"quarantined {name} -> {key}")
