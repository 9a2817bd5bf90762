"""The ``cloudckpt`` command: inspect, verify, restore, promote, clean up and copy checkpoints.

Every command takes a checkpoint ROOT: ``s3://bucket/prefix``, ``gs://bucket/prefix``,
``file:///path`` or a plain path.  A final path component ending in ``.ckpt`` names one
checkpoint in that root (``s3://b/run/checkpoint_step_00001200.ckpt``); commands that take
one may instead get it as a separate NAME argument, which may also be ``latest``, ``best``,
a pointer (``best_model_val_loss.ckpt``) or a step number.

Exit status: 0 success, 1 failure (an error, a failed verification), 2 a usage mistake
(bad URL, bad option).  Errors are one line on stderr; ``--debug`` shows tracebacks.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import math
import os
import re
import sys
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

import click

from . import __version__
from .copy import Copier, CopyStats, Progress, manifest_names
from .errors import CloudCkptError, CorruptCheckpoint, FormatVersionError, NotFound
from .format.manifest import Manifest, check_manifest_name, parse_manifest
from .pointers import (
    BEST_POINTER_PREFIX,
    LATEST_POINTER,
    Pointer,
    best_pointer_key,
    compare_and_swap,
    is_pointer_key,
    list_pointer_keys,
    read_pointer,
)
from .storage import Storage, open_storage
from .transfer import TransferConfig

log = logging.getLogger("cloudckpt.cli")

EXIT_FAILURE = 1
EXIT_USAGE = 2
_BUCKET_SCHEMES = ("s3", "gs", "gcs")


# -- errors ---------------------------------------------------------------------
class Failure(click.ClickException):
    """A failure reported as one line on stderr (exit 1, or 2 for a usage mistake)."""

    def __init__(self, message: str, exit_code: int = EXIT_FAILURE) -> None:
        super().__init__(" ".join(str(message).split()))
        self.exit_code = exit_code

    def show(self, file: Any = None) -> None:
        click.echo(f"cloudckpt: error: {self.message}", err=True)


class _Group(click.Group):
    """Turns the library's typed errors into one-line failures (tracebacks only with --debug)."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (click.ClickException, click.exceptions.Exit, click.Abort):
            raise
        except Exception as exc:
            if (ctx.obj or {}).get("debug"):
                raise
            if isinstance(exc, CloudCkptError):
                raise Failure(str(exc)) from exc
            if isinstance(exc, ImportError):
                raise Failure(str(exc)) from exc
            if isinstance(exc, OSError):
                raise Failure(f"{exc.strerror or exc}: {exc.filename}" if exc.filename else str(exc)) from exc
            raise


# -- roots and names --------------------------------------------------------------
def split_target(target: str) -> tuple[str, str | None]:
    """``ROOT[/NAME]`` -> (root, name or None): a last component ending in ``.ckpt`` is a name."""
    scheme = urlparse(target).scheme if "://" in target else ""
    if scheme in _BUCKET_SCHEMES:
        parsed = urlparse(target)
        head, _, last = parsed.path.rstrip("/").rpartition("/")
        if last.endswith(".ckpt"):
            return f"{scheme}://{parsed.netloc}{head}", last
        return target, None
    stripped = target.rstrip("/") or target
    head, sep, last = stripped.rpartition("/")
    if not last.endswith(".ckpt"):
        return target, None
    if not sep:
        return ".", last
    if head.endswith((":/", "://")) or head == "":
        head += "/"
    return head, last


def _local_path(url: str) -> Path:
    if url.startswith("file://"):
        return Path(unquote(urlparse(url).path))
    return Path(url).expanduser()


def open_root(url: str, endpoint_url: str | None = None, *, must_exist: bool = True) -> Storage:
    """Open a checkpoint root; bad URLs and missing local directories fail with one line."""
    scheme = urlparse(url).scheme if "://" in url else ""
    options: dict[str, Any] = {}
    if scheme in _BUCKET_SCHEMES:
        if endpoint_url:
            options["endpoint_url"] = endpoint_url
    elif scheme in ("", "file"):
        path = _local_path(url)
        if must_exist and not path.is_dir():
            raise Failure(f"{url}: no such directory" if not path.exists() else f"{url}: not a directory")
    elif scheme == "memory":
        raise Failure("memory:// stores live inside one process; the command line cannot open one",
                      EXIT_USAGE)
    else:
        raise Failure(f"unsupported storage URL {url!r}: use s3://BUCKET/PREFIX, gs://BUCKET/PREFIX, "
                      "file:///PATH or a local path", EXIT_USAGE)
    try:
        return open_storage(url, **options)
    except ValueError as exc:
        raise Failure(str(exc), EXIT_USAGE) from exc


def _read_pointer_or_none(store: Storage, key: str) -> Pointer | None:
    try:
        return read_pointer(store, key)
    except CorruptCheckpoint as exc:
        log.warning("%s", exc)
        return None


def pointers_of(store: Storage) -> dict[str, Pointer]:
    """Every readable pointer object: key -> pointer."""
    found = {}
    for key in list_pointer_keys(store):
        pointer = _read_pointer_or_none(store, key)
        if pointer is not None:
            found[key] = pointer
    return found


def _load(store: Storage, name: str) -> tuple[Manifest, bytes]:
    raw = store.get(name)
    return parse_manifest(raw, f"{store.url}/{name}"), raw


def _manifests(store: Storage, names: list[str]) -> dict[str, Manifest | Exception]:
    """Fetch and parse manifests in parallel; an unreadable one maps to its error."""

    def one(name: str) -> Manifest | Exception:
        try:
            return _load(store, name)[0]
        except (CorruptCheckpoint, FormatVersionError, NotFound) as exc:
            return exc

    with ThreadPoolExecutor(max_workers=8) as pool:
        return dict(zip(names, pool.map(one, names)))


def resolve(store: Storage, which: str | None, *, metric: str | None = None) -> str:
    """The checkpoint name ``which`` stands for: None/latest, best, a pointer, a step or a name."""
    names = manifest_names(store)
    if which in (None, "latest", LATEST_POINTER):
        pointer = _read_pointer_or_none(store, LATEST_POINTER)
        if pointer is not None and pointer.target in names:
            return pointer.target
        readable = [m for m in _manifests(store, names).values() if isinstance(m, Manifest)]
        if not readable:
            raise NotFound(f"{store.url}: no checkpoint here" if not names
                           else f"{store.url}: no readable checkpoint here")
        return max(readable, key=lambda m: (m.step, m.created)).name
    if which == "best" or (which.startswith(BEST_POINTER_PREFIX) and is_pointer_key(which)):
        key = which if which != "best" else _best_key(store, metric)
        pointer = read_pointer(store, key)
        if pointer is None:
            raise NotFound(f"{store.url}/{key}: no such best pointer")
        if pointer.target not in names:
            raise NotFound(f"{store.url}/{key} names {pointer.target}, which does not exist")
        return pointer.target
    if which.isdigit():
        step = int(which)
        matching = [m for m in _manifests(store, names).values() if isinstance(m, Manifest) and m.step == step]
        if not matching:
            raise NotFound(f"{store.url}: no checkpoint of step {step}")
        return max(matching, key=lambda m: m.created).name
    try:
        check_manifest_name(which)
    except ValueError as exc:
        raise Failure(f"{exc}; or use latest, best or a step number", EXIT_USAGE) from exc
    if which not in names:
        raise NotFound(f"{store.url}/{which}: no such checkpoint")
    return which


def _best_key(store: Storage, metric: str | None) -> str:
    if metric:
        return best_pointer_key(metric)
    keys = list_pointer_keys(store)[1:]
    if len(keys) == 1:
        return keys[0]
    if not keys:
        raise NotFound(f"{store.url}: no best pointer here")
    raise Failure(f"{store.url} has several best pointers ({', '.join(keys)}); choose one with --metric",
                  EXIT_USAGE)


def _target(root_arg: str, name_arg: str | None) -> tuple[str, str | None]:
    root, name = split_target(root_arg)
    if name is not None and name_arg is not None:
        raise Failure(f"{root_arg} already names checkpoint {name}; drop the NAME argument ({name_arg})",
                      EXIT_USAGE)
    return root, name if name is not None else name_arg


# -- state tree ---------------------------------------------------------------------
def tensor_paths(tree: Any, sep: str = "/") -> list[tuple[str, int]]:
    """(path in the state tree, tensor index) of every tensor the manifest's state tree references."""
    found: list[tuple[str, int]] = []

    def join(path: str, key: Any) -> str:
        return f"{path}{sep}{key}" if path else str(key)

    def walk(node: Any, path: str) -> None:
        if isinstance(node, dict):
            if len(node) == 1:
                (tag, value), = node.items()
                if tag in ("__tensor__", "__ndarray__") and isinstance(value, int):
                    found.append((path, value))
                    return
                if tag == "__tuple__":
                    walk(value, path)
                    return
                if tag == "__dict__" and isinstance(value, list):
                    for pair in value:
                        if isinstance(pair, list) and len(pair) == 2:
                            walk(pair[1], join(path, pair[0]))
                    return
            if "__state_dict__" in node:
                walk(node["__state_dict__"], path)  # "__metadata__" beside it holds no tensors
                return
            if len(node) == 1 and next(iter(node)).startswith("__"):
                return  # another tagged leaf: float, numpy scalar, bytes, dtype, pickle ...
            for key, value in node.items():
                walk(value, join(path, key))
        elif isinstance(node, list):
            for i, value in enumerate(node):
                walk(value, join(path, i))

    walk(tree, "")
    return found


# -- formatting -----------------------------------------------------------------------
def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} PiB"  # pragma: no cover


def human_age(created: _dt.datetime, now: _dt.datetime | None = None) -> str:
    seconds = max(0, int(((now or _dt.datetime.now(_dt.timezone.utc)) - created).total_seconds()))
    for size, unit in ((86400, "d"), (3600, "h"), (60, "m")):
        if seconds >= size:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


_DURATION = re.compile(r"(\d+(?:\.\d+)?)\s*([smhdw])")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_duration(text: str) -> _dt.timedelta:
    """``30m``, ``6h``, ``2d``, ``1h30m``, ``0`` -> timedelta; ValueError otherwise."""
    compact = text.strip().lower().replace(" ", "")
    if compact == "0":
        return _dt.timedelta(0)
    if not compact or _DURATION.sub("", compact):
        raise ValueError(f"{text!r} is not a duration like 30s, 30m, 6h, 2d or 1h30m")
    return _dt.timedelta(seconds=sum(float(n) * _UNITS[u] for n, u in _DURATION.findall(compact)))


class _Duration(click.ParamType):
    name = "DURATION"

    def convert(self, value: Any, param: Any, ctx: Any) -> _dt.timedelta:
        if isinstance(value, _dt.timedelta):
            return value
        try:
            return parse_duration(str(value))
        except ValueError as exc:
            self.fail(str(exc), param, ctx)


def _metric_text(metrics: dict[str, float | None]) -> str:
    return " ".join(f"{k}={_fmt_float(v)}" for k, v in sorted(metrics.items())) or "-"


def _fmt_float(v: float | None) -> str:
    return "-" if v is None else f"{v:.6g}"


def _json_safe(value: Any) -> Any:
    """Strict JSON: non-finite floats become the strings "nan", "inf", "-inf"."""
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, _dt.datetime):
        return value.isoformat()
    return value


def emit_json(value: Any) -> None:
    click.echo(json.dumps(_json_safe(value), indent=2, allow_nan=False))


def table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(r[i]) for r in [header] + rows) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in [header] + rows]
    return "\n".join(lines)


def _pointer_label(key: str) -> str:
    return key[: -len(".ckpt")]


# -- progress bars ---------------------------------------------------------------------
def _progress_factory(enabled: bool) -> Callable[[str], Progress | None]:
    """Byte progress bars on stderr, only when it is a terminal and tqdm is installed."""
    if not enabled or not sys.stderr.isatty():
        return lambda label: None
    try:
        from tqdm import tqdm  # type: ignore[import-untyped,unused-ignore]
    except ImportError:  # pragma: no cover - tqdm is a dependency; degrade quietly without it
        return lambda label: None

    def make(label: str) -> Progress:
        lock = threading.Lock()
        state: dict[str, Any] = {}

        def progress(advance: int, total: int) -> None:
            with lock:
                bar = state.get("bar")
                if bar is None:
                    bar = state["bar"] = tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024,
                                              desc=label, file=sys.stderr, leave=False, dynamic_ncols=True)
                bar.update(advance)
                if bar.n >= total:
                    bar.close()

        return progress

    return make


# -- common options ---------------------------------------------------------------------
def _common(f: Callable[..., Any]) -> Callable[..., Any]:
    f = click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON on stdout.")(f)
    f = click.option("--endpoint-url", envvar="CLOUDCKPT_ENDPOINT_URL", metavar="URL",
                     help="S3 or GCS endpoint (MinIO, an emulator...); env CLOUDCKPT_ENDPOINT_URL.")(f)
    return f


def _progress_option(f: Callable[..., Any]) -> Callable[..., Any]:
    return click.option("--progress/--no-progress", default=True,
                        help="Progress bars on stderr (only ever shown when it is a terminal).")(f)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--debug", is_flag=True, help="Show tracebacks instead of one-line errors.")
@click.option("-v", "--verbose", count=True, help="Log more (-v info, -vv debug).")
@click.version_option(__version__, prog_name="cloudckpt")
@click.pass_context
def cli(ctx: click.Context, debug: bool, verbose: int) -> None:
    """Inspect, verify, restore, promote, clean up and copy cloudckpt checkpoints.

    ROOT is s3://BUCKET/PREFIX, gs://BUCKET/PREFIX, file:///PATH or a local path.
    ROOT/NAME.ckpt names one checkpoint.  Credentials come from the usual
    environment (AWS_*, AWS_PROFILE, GOOGLE_APPLICATION_CREDENTIALS, ...).
    """
    ctx.obj = {"debug": debug}
    level = logging.WARNING if verbose == 0 else logging.INFO if verbose == 1 else logging.DEBUG
    logging.basicConfig(level=level, format="cloudckpt: %(levelname)s: %(message)s", stream=sys.stderr)
    if verbose < 2:  # the SDKs' own chatter (retries, auth probes) is not for users; errors say enough
        for noisy in ("botocore", "boto3", "urllib3", "google", "google.auth"):
            logging.getLogger(noisy).setLevel(logging.ERROR)


# -- ls -----------------------------------------------------------------------------------
@cli.command("ls")
@click.argument("root")
@_common
def ls_cmd(root: str, endpoint_url: str | None, as_json: bool) -> None:
    """List the checkpoints under ROOT, oldest step first, with the pointers naming them."""
    from .manager import CheckpointManager

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
    from .manager import CheckpointManager

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
    from .reader import ChunkFetcher

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
            names = [m.name for m in sorted((m for m in manifests.values() if isinstance(m, Manifest)),
                                            key=lambda m: (m.step, m.created))]
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
    from .reader import read_tensors

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


# -- promote ------------------------------------------------------------------------------
@cli.command("promote")
@click.argument("target", metavar="ROOT/NAME")
@click.argument("name", required=False)
@click.option("--metric", help="Point best_model_<METRIC>.ckpt at this checkpoint (value from its metrics).")
@click.option("--mode", type=click.Choice(["min", "max"]),
              help="Direction of METRIC (default: the current pointer's, else min).")
@click.option("--latest", "latest", is_flag=True, help="Point latest.ckpt at this checkpoint (a rollback).")
@click.option("--pin/--unpin", "pin", default=None, help="Pin (or unpin) it: retention never removes a pinned one.")
@_common
def promote_cmd(target: str, name: str | None, metric: str | None, mode: str | None, latest: bool,
                pin: bool | None, endpoint_url: str | None, as_json: bool) -> None:
    """Point the best (or latest) pointer at a checkpoint, and/or pin it.

    This is an operator decision: it FORCES the pointer to this checkpoint even when the
    one it names now is better (or newer), overriding the forward-only rule savers obey.
    Running trainers keep moving the pointer forward from here when they beat it.
    """
    from .manager import CheckpointManager

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
            changes.append(_force(store, LATEST_POINTER, Pointer(manifest.name, manifest.step)))
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
    before: list[str | None] = [None]

    def update(current: bytes | None) -> bytes | None:
        old = None
        if current is not None:
            try:
                old = Pointer.from_bytes(current, f"{store.url}/{key}")
            except CorruptCheckpoint:
                old = None
        before[0] = old.target if old is not None else None
        return None if old == pointer else pointer.to_bytes()

    changed = compare_and_swap(store, key, update)
    return {"pointer": key, "before": before[0], "changed": changed}


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
@_common
def gc_cmd(root: str, yes: bool, keep_last: int | None, keep_best: int | None, metric: str | None, mode: str,
           cleanup: str, grace: _dt.timedelta, upload_age: _dt.timedelta, endpoint_url: str | None,
           as_json: bool) -> None:
    """Remove checkpoints the retention options do not keep, and sweep unreferenced chunks.

    A dry run unless --yes.  Without --keep-last/--keep-best every checkpoint is kept and only
    garbage (chunks of failed saves, stale multipart uploads) is cleaned.  Checkpoints named by
    a pointer (latest, best) or pinned are always kept.
    """
    from .manager import CheckpointManager
    from .retention import KeepBestK, KeepLastN, RetentionPolicy
    from .sweeper import SweepConfig

    if keep_best is not None and not metric:
        raise Failure("--keep-best needs --metric (and --mode if higher is better)", EXIT_USAGE)
    policies = ([KeepLastN(keep_last)] if keep_last else []) + ([KeepBestK(keep_best)] if keep_best else [])
    policy: RetentionPolicy | None = None
    for p in policies:
        policy = p if policy is None else policy | p
    store = open_root(root, endpoint_url)
    config = SweepConfig(cleanup=cleanup, grace=grace, stale_upload_age=upload_age)  # type: ignore[arg-type]
    with store:
        mgr = CheckpointManager(store, monitor=metric, mode=mode,  # type: ignore[arg-type]
                                retention=policy, cleanup=config, capture_rng=False)
        infos = {i.name: i for i in mgr.list()}
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


def _fmt_duration(delta: _dt.timedelta) -> str:
    seconds = int(delta.total_seconds())
    for size, unit in ((86400, "d"), (3600, "h"), (60, "m")):
        if seconds and seconds % size == 0:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``cloudckpt`` console script."""
    cli.main(args=argv, prog_name="cloudckpt")


if __name__ == "__main__":
    main()
