"""The run's tables as Markdown (``results.md``), the form docs/PERFORMANCE.md quotes.

    python -m suite.markdown benchmarks/results/results.json     # from benchmarks/, for an older run
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path
from typing import Any

GiB = 1024**3


def _rate(row: dict[str, Any]) -> tuple[float, float, float]:
    rates = [row["nbytes"] / s["seconds"] / 1e6 for s in row["samples"]]
    return statistics.median(rates), min(rates), max(rates)


def _cpu(row: dict[str, Any] | None, key: str) -> str:
    if row is None:
        return "-"
    values = [s[key] for s in row["samples"] if s[key] is not None]
    return f"{statistics.median(values) / (row['nbytes'] / GiB):.2f}" if values else "-"


def _speed(row: dict[str, Any] | None) -> str:
    if row is None:
        return "-"
    median, low, high = _rate(row)
    return f"{median:.0f} ({low:.0f}-{high:.0f})"


def render(report: dict[str, Any]) -> str:
    lines: list[str] = []
    results, notes = report["results"], report.get("notes", {})
    for setting in dict.fromkeys(r["setting"] for r in results):
        lines += [f"### {setting}", ""]
        lines += [f"{note}.  " for note in notes.get(setting, [])]
        lines += ["", "| contender | save MB/s (min-max) | restore MB/s (min-max) | client CPU-s/GiB save / restore "
                      "| server CPU-s/GiB save / restore | load |", "| --- | ---: | ---: | ---: | ---: | ---: |"]
        for name in dict.fromkeys(r["contender"] for r in results if r["setting"] == setting):
            save, restore = ({r["op"]: r for r in results if r["setting"] == setting and r["contender"] == name}.get(op)
                             for op in ("save", "restore"))
            loads = [s["load"] for row in (save, restore) if row for s in row["samples"]]
            lines.append(f"| {name} | {_speed(save)} | {_speed(restore)} | {_cpu(save, 'client_cpu')} / "
                         f"{_cpu(restore, 'client_cpu')} | {_cpu(save, 'server_cpu')} / {_cpu(restore, 'server_cpu')} "
                         f"| {max(loads):.1f} |")
        lines.append("")
    figures = report.get("figures", [])
    for setting in dict.fromkeys(f["setting"] for f in figures):
        lines += [f"### {setting}", ""]
        lines += [f"{note}.  " for note in notes.get(setting, [])]
        lines += ["", "| figure | unit | median | min-max |", "| --- | --- | ---: | ---: |"]
        for f in (f for f in figures if f["setting"] == setting):
            lines.append(f"| {f['name']} | {f['unit']} | {f['median']:.3f} | {min(f['samples']):.3f}-"
                         f"{max(f['samples']):.3f} |")
        lines.append("")
    lines += ["### Targets", "", "| setting | target | value | goal | met |", "| --- | --- | ---: | ---: | --- |"]
    for t in report.get("targets", []):
        sign = ">=" if t["higher_is_better"] else "<="
        value = "-" if t["value"] is None else f"{t['value']:.2f}"
        lines.append(f"| {t['setting']} | {t['label']} | {value} | {sign} {t['goal']} | {'yes' if t['met'] else 'NO'} |")
    if report.get("skipped"):
        lines += ["", "### Could not run", ""] + [f"- {what}: {why}" for what, why in report["skipped"].items()]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    source = Path(sys.argv[1])
    print(render(json.loads(source.read_text())))
