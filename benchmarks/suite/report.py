"""Print the tables, write results.json and (with matplotlib) results.png."""

from __future__ import annotations

import json
import logging
import os
import platform
from pathlib import Path
from typing import Any

import torch

import cloudckpt

from .harness import Bench
from .markdown import render
from .measure import git_revision


def machine() -> dict[str, Any]:
    return {"python": platform.python_version(), "torch": torch.__version__, "cpus": os.cpu_count(),
            "platform": platform.platform(), "threads": torch.get_num_threads(),
            "cloudckpt": cloudckpt.__version__, "revision": git_revision(),
            "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None}


def _cpu(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def print_tables(bench: Bench) -> None:
    for setting in dict.fromkeys(r.setting for r in bench.results):
        print(f"\n## {setting}")
        for note in bench.notes.get(setting, []):
            print(f"   {note}")
        print(f"{'contender':62} {'op':8} {'MB/s':>7} {'min-max':>11} {'CPU-s/GiB':>9} {'server':>7} {'load':>5}")
        for r in (r for r in bench.results if r.setting == setting):
            rates = r.rates()
            loads = [s.load for s in r.samples]
            print(f"{r.contender[:62]:62} {r.op:8} {r.mbps:7.1f} {min(rates):5.0f}-{max(rates):<5.0f} "
                  f"{r.client_cpu_per_gib:9.2f} {_cpu(r.server_cpu_per_gib):>7} {max(loads):5.1f}")
    for setting in dict.fromkeys(f.setting for f in bench.figures):
        print(f"\n## {setting}")
        for note in bench.notes.get(setting, []):
            print(f"   {note}")
        for f in (f for f in bench.figures if f.setting == setting):
            print(f"{f.name[:70]:70} {f.unit:9} {f.median:9.3f} ({min(f.samples):.3f}-{max(f.samples):.3f})")
    if bench.skipped:
        print("\n## could not run")
        for what, why in bench.skipped.items():
            print(f"{what}: {why}")
    print(f"\n{'target':92} {'value':>7}  {'goal':>7} met")
    for t in bench.targets:
        sign = ">=" if t.higher_is_better else "<="
        value = "-" if t.value is None else f"{t.value:7.2f}"
        print(f"{(t.setting + ': ' + t.label)[:92]:92} {value:>7}  {sign}{t.goal:<5} {'yes' if t.met else 'NO'}")


def write(bench: Bench, out: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    report = {"machine": machine(), "args": {k: str(v) for k, v in vars(bench.args).items()},
              "results": [r.row() for r in bench.results], "figures": [f.row() for f in bench.figures],
              "targets": [t.row() for t in bench.targets], "skipped": bench.skipped, "notes": bench.notes}
    path = out / "results.json"
    path.write_text(json.dumps(report, indent=2, default=str))
    (out / "results.md").write_text(render(json.loads(path.read_text())))
    _plot(bench, out / "results.png")
    return path


def _plot(bench: Bench, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logging.warning("matplotlib not installed (pip install -e '.[bench]'); no plot written")
        return
    settings = list(dict.fromkeys(r.setting for r in bench.results))
    if not settings:
        return
    fig, axes = plt.subplots(len(settings), 2, figsize=(13, 2.4 + 0.5 * len(bench.results) / max(1, len(settings))),
                             squeeze=False)
    for row, setting in zip(axes, settings):
        for ax, op in zip(row, ("save", "restore")):
            rows = [r for r in bench.results if r.setting == setting and r.op == op]
            ax.barh([r.contender[:48] for r in rows], [r.mbps for r in rows])
            ax.set_title(f"{setting}: {op} (MB/s, median)", fontsize=9)
            ax.tick_params(axis="y", labelsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
