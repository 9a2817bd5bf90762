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
from ..format.manifest import Manifest
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
from .targets import _load, _manifests, _target, open_root, pointers_of, resolve


# -- ls -----------------------------------------------------------------------------------
@cli.command("ls")
@click.argument("root")
@_common
def ls_cmd(root: str, endpoint_url: str | None, as_json: bool) -> None:
    """List the checkpoints under ROOT, oldest step first, with the pointers naming them."""
    from ..manager import CheckpointManager

    store = open_root(root, endpoint_url)
    with store:
        names = manifest_names(store)
        manifests = _manifests(store, names)
        pointers = pointers_of(store)
        pinned = CheckpointManager(store, capture_rng=False).pinned()
    now = _dt.datetime.now(_dt.timezone.utc)
    named_by: dict[str, list[str]] = {}
    for key, pointer in sorted(pointers.items()):
        named_by.setdefault(pointer.target, []).append(key)
    good = sorted((m for m in manifests.values() if isinstance(m, Manifest)), key=lambda m: (m.step, m.created))
    bad = {n: e for n, e in manifests.items() if not isinstance(e, Manifest)}
    if as_json:
        emit_json({
            "root": store.url,
            "checkpoints": [{
                "name": m.name, "step": m.step, "epoch": m.epoch, "metrics": m.metrics,
                "nbytes": m.nbytes, "stored_bytes": m.stored_bytes, "chunks": len(m.chunks),
                "created": m.created, "age_seconds": int((now - m.created_at).total_seconds()),
                "reason": m.reason, "pointers": named_by.get(m.name, []), "pinned": m.name in pinned,
            } for m in good],
            "unreadable": [{"name": n, "error": str(e)} for n, e in sorted(bad.items())],
            "pointers": {k: {"target": p.target, "step": p.step, "metric": p.metric, "value": p.value,
                             "mode": p.mode} for k, p in sorted(pointers.items())},
        })
        return
    if not good and not bad:
        click.echo(f"no checkpoints under {store.url}", err=True)
        return
    rows = []
    for m in good:
        flags = [_pointer_label(k) for k in named_by.get(m.name, [])] + (["pinned"] if m.name in pinned else [])
        rows.append([m.name, str(m.step), "-" if m.epoch is None else str(m.epoch), _metric_text(m.metrics),
                     human_bytes(m.nbytes), human_age(m.created_at, now), ", ".join(flags)])
    for name, error in sorted(bad.items()):
        rows.append([name, "?", "?", "UNREADABLE", "?", "?", type(error).__name__])
    click.echo(table(rows, ["NAME", "STEP", "EPOCH", "METRICS", "SIZE", "AGE", "POINTERS"]))
    dangling = [f"{k} -> {p.target}" for k, p in sorted(pointers.items()) if p.target not in manifests]
    for line in dangling:
        click.echo(f"cloudckpt: warning: pointer {line}, which does not exist", err=True)


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
        "created": manifest.created, "host": manifest.host, "library_version": manifest.library_version,
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
@_progress_option
@_common
def verify_cmd(target: str, name: str | None, all_: bool, metric: str | None, progress: bool,
               endpoint_url: str | None, as_json: bool) -> None:
    """Re-check a checkpoint (default: latest): manifest checksum and every chunk's size, CRC32C, BLAKE3.

    Prints OK or FAILED per checkpoint and exits 1 if any failed.
    """
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
        for n in names:
            result = verify_checkpoint(store, n, progress=bars(f"verify {n}"))
            results.append(result)
            if not as_json:
                if result.ok:
                    click.echo(f"OK      {n}  {result.chunks} chunks, {human_bytes(result.bytes)}")
                else:
                    click.echo(f"FAILED  {n}  {len(result.errors or [])} problem(s):")
                    for error in result.errors or []:
                        click.echo(f"          {error}")
    failed = [r for r in results if not r.ok]
    if as_json:
        emit_json({"root": store.url, "ok": not failed,
                   "checkpoints": [{"name": r.name, "ok": r.ok, "chunks": r.chunks, "bytes": r.bytes,
                                    "errors": r.errors or []} for r in results]})
    elif len(results) > 1:
        click.echo(f"{len(results) - len(failed)} OK, {len(failed)} FAILED")
    if failed:
        sys.exit(EXIT_FAILURE)
