"""Commands that copy checkpoints: ``cp`` between stores, ``restore`` to a local directory or an export file."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import click

from ..copy import Copier, CopyStats, manifest_names
from ..errors import CloudCkptError, NotFound
from ..format.manifest import Manifest
from ..resolver import Resolver
from ..storage import Storage
from ..transfer import TransferConfig
from .app import EXIT_FAILURE, EXIT_USAGE, Failure, _common, _progress_option, cli
from .render import (
    _pointer_label,
    _progress_factory,
    emit_json,
    human_bytes,
    tensor_paths,
)
from .targets import _load, _manifests, open_root, resolve, split_target


# -- copy (restore, cp) ----------------------------------------------------------------------
def _copy_line(stats: CopyStats) -> str:
    if stats.already_present:
        head = f"{stats.name}: already there"
    else:
        head = (f"{stats.name}: {stats.chunks_copied} chunks copied ({human_bytes(stats.bytes_copied)}), "
                f"{stats.chunks_skipped} already there ({human_bytes(stats.bytes_skipped)})")
    moved = ", ".join(_pointer_label(p) for p in stats.pointers_moved)
    return head + (f"; moved {moved}" if moved else "")


def _stats_json(stats: CopyStats) -> dict[str, Any]:
    return {"name": stats.name, "chunks_copied": stats.chunks_copied, "chunks_skipped": stats.chunks_skipped,
            "bytes_copied": stats.bytes_copied, "bytes_skipped": stats.bytes_skipped,
            "already_present": stats.already_present, "pointers_moved": stats.pointers_moved}


@cli.command("cp")
@click.argument("source", metavar="SRC[/NAME]")
@click.argument("dest", metavar="DST")
@click.option("--src-endpoint-url", metavar="URL", help="Endpoint for SRC (default: --endpoint-url).")
@click.option("--dst-endpoint-url", metavar="URL", help="Endpoint for DST (default: --endpoint-url).")
@click.option("--full-verify", is_flag=True, help="Check each chunk's BLAKE3 in transit too (CRC32C always).")
@_progress_option
@_common
def cp_cmd(source: str, dest: str, src_endpoint_url: str | None, dst_endpoint_url: str | None,
           full_verify: bool, progress: bool, endpoint_url: str | None, as_json: bool) -> None:
    """Copy checkpoints between stores (S3, GCS, local), one or every one (oldest first).

    Chunks the destination already has are skipped; every copied chunk's CRC32C is
    checked in transit.  Each checkpoint is committed at DST like a save: manifest
    last (create-only), then latest/best pointers moved forward only, then the index.
    """
    src_root, name = split_target(source)
    if split_target(dest)[1] is not None:
        raise Failure(f"DST {dest} is a checkpoint root, not a checkpoint; drop the final .ckpt name", EXIT_USAGE)
    src = open_root(src_root, src_endpoint_url or endpoint_url)
    dst = open_root(dest, dst_endpoint_url or endpoint_url, must_exist=False)
    bars = _progress_factory(progress and not as_json)
    results: list[dict[str, Any]] = []
    failures = 0
    with src, dst:
        if name is not None:
            names = [resolve(src, name)]
        else:
            manifests = _manifests(src, manifest_names(src))
            for bad, error in sorted((n, e) for n, e in manifests.items() if not isinstance(e, Manifest)):
                failures += 1
                results.append({"name": bad, "error": str(error)})
                if not as_json:
                    click.echo(f"cloudckpt: error: {bad}: not copied: {error}", err=True)
            live = Resolver(src).view(pointers=False).live_names()  # superseded ones stay behind
            names = [m.name for m in sorted((m for m in manifests.values() if isinstance(m, Manifest)),
                                            key=lambda m: (m.step, m.created)) if m.name in live]
            if not names and not failures:
                raise NotFound(f"{src.url}: no checkpoint to copy")
        copier = Copier(src, dst, full_verify=full_verify)
        for n in names:
            try:
                stats = copier.copy(n, progress=bars(f"copy {n}"))
            except CloudCkptError as exc:
                failures += 1
                results.append({"name": n, "error": str(exc)})
                if not as_json:
                    click.echo(f"cloudckpt: error: {n}: not copied: {' '.join(str(exc).split())}", err=True)
                continue
            results.append(_stats_json(stats))
            if not as_json:
                click.echo(_copy_line(stats))
    if as_json:
        emit_json({"source": src.url, "destination": dst.url, "ok": not failures, "checkpoints": results})
    if failures:
        sys.exit(EXIT_FAILURE)


@cli.command("restore")
@click.argument("source", metavar="ROOT[/NAME]")
@click.argument("dest", metavar="DEST", required=False)
@click.option("--export", "export", type=click.Path(dir_okay=False, path_type=Path),
              help="Write only the model weights to this .safetensors or .pt file, for serving.")
@click.option("--key", default="model", show_default=True, help="The state entry --export writes.")
@click.option("--metric", help="With NAME=best: the metric whose best pointer to follow.")
@_progress_option
@_common
def restore_cmd(source: str, dest: str | None, export: Path | None, key: str, metric: str | None,
                progress: bool, endpoint_url: str | None, as_json: bool) -> None:
    """Copy one checkpoint (default: latest) to the local directory DEST, or --export its model weights.

    DEST becomes a checkpoint root a training job can resume from
    (CheckpointManager(DEST).restore(state)); its latest pointer moves forward only.
    """
    if dest is None and export is None:
        raise Failure("give a local directory DEST to copy the checkpoint to, or --export FILE", EXIT_USAGE)
    if dest is not None and not Path(dest).is_dir() and (
            dest in ("latest", "best") or dest.isdigit() or dest.endswith(".ckpt")):
        raise Failure(f"DEST {dest!r} looks like a choice of checkpoint, not a directory: write "
                      f"`cloudckpt restore {source}@{dest} DIR` (or ./{dest} for a directory of that name)", EXIT_USAGE)
    if dest is not None and (urlparse(dest).scheme if "://" in dest else "") not in ("", "file"):
        raise Failure(f"restore writes to a local directory, not {dest}; use `cloudckpt cp` between stores",
                      EXIT_USAGE)
    if export is not None and export.suffix not in (".pt", ".pth", ".safetensors"):
        raise Failure(f"--export {export}: the file name must end in .safetensors or .pt", EXIT_USAGE)
    root, which = split_target(source)
    store = open_root(root, endpoint_url)
    bars = _progress_factory(progress and not as_json)
    out: dict[str, Any] = {"source": store.url}
    with store:
        name = resolve(store, which, metric=metric)
        out["name"] = name
        if dest is not None:
            with open_root(dest, must_exist=False) as local:
                stats = Copier(store, local).copy(name, progress=bars(f"restore {name}"))
            out["restored"] = {"destination": local.url, **_stats_json(stats)}
            if not as_json:
                click.echo(f"restored to {local.url}: {_copy_line(stats)}")
        if export is not None:
            count, nbytes = export_weights(store, name, export, key=key)
            out["exported"] = {"file": str(export), "key": key, "tensors": count, "bytes": nbytes}
            if not as_json:
                click.echo(f"exported {count} tensors ({human_bytes(nbytes)}) of {key!r} from {name} to {export}")
    if as_json:
        emit_json(out)


def export_weights(store: Storage, name: str, path: Path, *, key: str = "model") -> tuple[int, int]:
    """Write the tensors of state entry ``key`` of checkpoint ``name`` to a .pt or .safetensors file.

    Keys are the entry's state-dict keys (nested levels joined with "."), so a module's
    weights load with ``model.load_state_dict``.  Returns (tensor count, bytes).
    """
    from ..reader import read_tensors

    manifest, _ = _load(store, name)
    tree = manifest.state if isinstance(manifest.state, dict) else {}
    if key not in tree:
        entries = ", ".join(sorted(k for k in tree if not k.startswith("_cloudckpt"))) or "none"
        raise Failure(f"{store.url}/{name} has no state entry {key!r} (entries: {entries}); choose one with --key")
    paths = tensor_paths(tree[key], sep=".")
    if not paths:
        raise Failure(f"{store.url}/{name}: state entry {key!r} holds no tensors")
    save = _saver(path)
    tensors, _ = read_tensors(store, manifest, {}, TransferConfig(), only={i for _, i in paths})
    weights: dict[str, Any] = {}
    seen: set[int] = set()
    for tensor_path, index in paths:
        tensor = tensors[index]
        # safetensors refuses shared storage; tied weights are written as separate copies.
        weights[tensor_path or key] = tensor.clone() if index in seen and path.suffix == ".safetensors" else tensor
        seen.add(index)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        save(weights, tmp, {"cloudckpt_checkpoint": name, "cloudckpt_step": str(manifest.step),
                            "cloudckpt_source": store.url, "cloudckpt_key": key})
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return len(weights), sum(t.numel() * t.element_size() for t in weights.values())


def _saver(path: Path) -> Callable[[dict[str, Any], Path, dict[str, str]], None]:
    if path.suffix == ".safetensors":
        try:
            from safetensors.torch import save_file
        except ImportError as exc:
            raise Failure("--export to .safetensors needs the safetensors package: pip install safetensors") from exc
        return lambda weights, target, metadata: save_file(weights, str(target), metadata=metadata)

    def save_pt(weights: dict[str, Any], target: Path, metadata: dict[str, str]) -> None:
        import torch

        torch.save(weights, target)

    return save_pt
