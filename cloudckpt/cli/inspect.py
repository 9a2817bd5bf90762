"""Read-only commands: ``ls``, ``show`` and ``verify``."""

from __future__ import annotations

import datetime as _dt
import json
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import click

from ..copy import Progress, manifest_names
from ..errors import CloudCkptError, CorruptCheckpoint, FormatVersionError, NotFound
from ..storage import Storage
from ..transfer import TransferConfig
from .app import EXIT_FAILURE, EXIT_USAGE, Failure, _common, _progress_option, cli
from .render import (
    _metric_text,
    _pointer_label,
    _progress_factory,
    emit_json,
    human_age,
    human_bytes,
    table,
    tensor_paths,
)
from .listing import RootListing, render_tree
from .targets import _load, _target, open_root, pointers_of, resolve


# -- ls -----------------------------------------------------------------------------------
@cli.command("ls")
@click.argument("root")
@click.option("--tree", is_flag=True, help="Show the history as a tree of timelines (forks, rollbacks).")
@_common
def ls_cmd(root: str, tree: bool, endpoint_url: str | None, as_json: bool) -> None:
    """List the checkpoints under ROOT, oldest step first: the live ones with the pointers that
    resolve to them, then superseded, quarantined and unreadable objects with their status."""
    from ..manager import CheckpointManager

    store = open_root(root, endpoint_url)
    with store:
        listing = RootListing.of(store, CheckpointManager(store, capture_rng=False).pinned())
    now = _dt.datetime.now(_dt.timezone.utc)
    if as_json:
        emit_json(listing.to_json(now))
        return
    if listing.empty:
        click.echo(f"no checkpoints under {store.url}", err=True)
        return
    click.echo(render_tree(listing) if tree else listing.table(now))
    for line in listing.warnings():
        click.echo(f"cloudckpt: warning: {line}", err=True)


# -- show -------------------------------------------------------------------------------
@cli.command("show")
@click.argument("target", metavar="ROOT[/NAME]")
@click.argument("name", required=False)
@click.option("--metric", help="With NAME=best: the metric whose best pointer to follow.")
@_common
def show_cmd(target: str, name: str | None, metric: str | None, endpoint_url: str | None, as_json: bool) -> None:
    """Show one checkpoint's manifest and tensors (default: latest)."""
    from ..manager import CheckpointManager

    root, which = _target(target, name)
    store = open_root(root, endpoint_url)
    with store:
        resolved = resolve(store, which, metric=metric)
        manifest, raw = _load(store, resolved)
        stored_version = json.loads(raw).get("format_version")
        pointers = [k for k, p in sorted(pointers_of(store).items()) if p.target == resolved]
        pinned = resolved in CheckpointManager(store, capture_rng=False).pinned()
    tensors: list[dict[str, Any]] = []
    for path, index in tensor_paths(manifest.state):
        entry = manifest.tensors[index] if 0 <= index < len(manifest.tensors) else None
        tensors.append({"path": path, "index": index,
                        "dtype": entry.dtype if entry else "?", "shape": list(entry.shape) if entry else [],
                        "nbytes": entry.nbytes if entry else 0})
    summary = {
        "root": store.url, "name": manifest.name, "format_version": stored_version,
        "step": manifest.step, "epoch": manifest.epoch, "reason": manifest.reason,
        "created": manifest.created, "timeline": manifest.lineage.timeline, "parent": manifest.lineage.parent,
        "host": manifest.host, "library_version": manifest.library_version,
        "metrics": manifest.metrics, "chunks": len(manifest.chunks), "nbytes": manifest.nbytes,
        "stored_bytes": manifest.stored_bytes, "compression": manifest.compression,
        "pickled": manifest.pickled, "config": manifest.config, "pointers": pointers, "pinned": pinned,
        "tensor_count": len(manifest.tensors), "tensors": tensors,
    }
    if as_json:
        emit_json(summary)
        return
    created = f"{manifest.created} ({human_age(manifest.created_at)} ago)"
    lines = [
        ("checkpoint", f"{store.url.rstrip('/')}/{manifest.name}"),
        ("format", f"cloudckpt v{stored_version}"),
        ("step", str(manifest.step)),
        ("epoch", "-" if manifest.epoch is None else str(manifest.epoch)),
        ("reason", manifest.reason),
        ("timeline", manifest.lineage.timeline),
        ("parent", manifest.lineage.parent or "- (a fresh start)"),
        ("created", created),
        ("host", manifest.host or "-"),
        ("library", manifest.library_version or "-"),
        ("metrics", _metric_text(manifest.metrics)),
        ("chunks", f"{len(manifest.chunks)} ({human_bytes(manifest.stored_bytes)} stored)"),
        ("tensor bytes", f"{human_bytes(manifest.nbytes)} in {len(manifest.tensors)} tensors"),
        ("compression", manifest.compression),
        ("pointers", ", ".join(_pointer_label(p) for p in pointers) or "-"),
        ("pinned", "yes" if pinned else "no"),
    ]
    if manifest.pickled:
        lines.append(("pickled", "yes: loading needs allow_pickle=True"))
    width = max(len(k) for k, _ in lines)
    for key, value in lines:
        click.echo(f"{key.ljust(width)}  {value}")
    if tensors:
        click.echo("")
        click.echo(table([[t["path"], t["dtype"], str(tuple(t["shape"])),
                           human_bytes(t["nbytes"])] for t in tensors],
                         ["TENSOR", "DTYPE", "SHAPE", "SIZE"]))


# -- verify -----------------------------------------------------------------------------
@dataclass
class VerifyResult:
    name: str
    ok: bool
    chunks: int = 0
    bytes: int = 0
    errors: list[str] | None = None


def verify_checkpoint(store: Storage, name: str, *, transfer: TransferConfig | None = None,
                      progress: Progress | None = None) -> VerifyResult:
    """Re-read one checkpoint: the manifest checksum, then every chunk's size, CRC32C and BLAKE3.

    Unlike :func:`cloudckpt.reader.verify_chunks` it does not stop at the first bad chunk: every
    failure is collected, so a report names all damaged objects.
    """
    from ..reader import ChunkFetcher

    transfer = transfer or TransferConfig()
    try:
        manifest, _ = _load(store, name)
    except (CorruptCheckpoint, FormatVersionError, NotFound) as exc:
        return VerifyResult(name, False, errors=[str(exc)])
    unique = list({c.key: c for c in manifest.chunks}.values())
    total = sum(c.size for c in unique)
    if progress is not None:
        progress(0, total)
    fetcher = ChunkFetcher(store, transfer, full=True)
    errors: list[str] = []
    lock = threading.Lock()
    result = VerifyResult(name, True, errors=errors)

    def check(ref: Any) -> None:
        try:
            fetcher.fetch(ref)
        except CloudCkptError as exc:
            with lock:
                errors.append(str(exc))
        else:
            with lock:
                result.chunks += 1
                result.bytes += ref.size
        if progress is not None:
            progress(ref.size, total)

    try:
        with ThreadPoolExecutor(max_workers=transfer.concurrency, thread_name_prefix="cloudckpt-verify") as pool:
            list(pool.map(check, unique))
    finally:
        fetcher.close()
    errors.sort()
    result.ok = not errors
    return result


@cli.command("verify")
@click.argument("target", metavar="ROOT[/NAME]")
@click.argument("name", required=False)
@click.option("--all", "all_", is_flag=True, help="Verify every checkpoint under ROOT.")
@click.option("--metric", help="With NAME=best: the metric whose best pointer to follow.")
@click.option("--repair", is_flag=True, help="Quarantine each checkpoint that fails (moved aside with the reason; "
                                             "its name is free, gc then sweeps the chunks only it used).")
@_progress_option
@_common
def verify_cmd(target: str, name: str | None, all_: bool, metric: str | None, repair: bool, progress: bool,
               endpoint_url: str | None, as_json: bool) -> None:
    """Re-check a checkpoint (default: latest): manifest checksum and every chunk's size, CRC32C, BLAKE3.

    Prints OK or FAILED per checkpoint and exits 1 if any failed (and was not repaired).
    """
    from ..manager import CheckpointManager

    root, which = _target(target, name)
    if all_ and which is not None:
        raise Failure("--all verifies every checkpoint; do not name one as well", EXIT_USAGE)
    store = open_root(root, endpoint_url)
    bars = _progress_factory(progress and not as_json)
    with store:
        names = sorted(manifest_names(store)) if all_ else [resolve(store, which, metric=metric)]
        if not names:
            raise NotFound(f"{store.url}: no checkpoint here")
        results = []
        repaired: dict[str, str | None] = {}
        for n in names:
            result = verify_checkpoint(store, n, progress=bars(f"verify {n}"))
            results.append(result)
            if repair and not result.ok and "/" not in n:
                repaired[n] = CheckpointManager(store, capture_rng=False).quarantine(
                    n, "; ".join(result.errors or ["failed verification"]))
            if not as_json:
                if result.ok:
                    click.echo(f"OK      {n}  {result.chunks} chunks, {human_bytes(result.bytes)}")
                else:
                    click.echo(f"FAILED  {n}  {len(result.errors or [])} problem(s):")
                    for error in result.errors or []:
                        click.echo(f"          {error}")
                    if n in repaired:
                        click.echo(f"          quarantined -> {repaired[n]}")
    failed = [r for r in results if not r.ok and r.name not in repaired]
    if as_json:
        emit_json({"root": store.url, "ok": not failed,
                   "checkpoints": [{"name": r.name, "ok": r.ok, "chunks": r.chunks, "bytes": r.bytes,
                                    "errors": r.errors or [], "quarantined": repaired.get(r.name)}
                                   for r in results]})
    elif len(results) > 1:
        click.echo(f"{len(results) - len(failed)} OK, {len(failed)} FAILED")
    if failed:
        sys.exit(EXIT_FAILURE)
