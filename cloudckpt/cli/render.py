"""Output for people and scripts: tables, JSON, human sizes, ages and durations, tensor paths, progress bars."""

from __future__ import annotations

import datetime as _dt
import json
import math
import re
import sys
import threading
from collections.abc import Callable
from typing import Any

import click

from ..copy import Progress


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


def _fmt_duration(delta: _dt.timedelta) -> str:
    seconds = int(delta.total_seconds())
    for size, unit in ((86400, "d"), (3600, "h"), (60, "m")):
        if seconds and seconds % size == 0:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


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
