"""What a run collects: contender results, single figures, targets, notes and what could not run."""

from __future__ import annotations

import argparse
import statistics
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .measure import Result, Target, load_average


@dataclass
class Figure:
    """A measurement that is not a save/restore of a contender (a blocking time, a ratio, a count)."""

    setting: str
    name: str
    unit: str
    samples: list[float]

    @property
    def median(self) -> float:
        return statistics.median(self.samples)

    def row(self) -> dict[str, Any]:
        return {**vars(self), "median": self.median}


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.results: list[Result] = []
        self.figures: list[Figure] = []
        self.targets: list[Target] = []
        self.skipped: dict[str, str] = {}
        self.notes: dict[str, list[str]] = {}
        self.workdir = Path(tempfile.mkdtemp(prefix="cloudckpt-bench-", dir=args.tmp))

    def add(self, setting: str, results: list[Result], skipped: dict[str, str]) -> None:
        self.results += results
        self.skipped.update({f"{setting} / {name}": why for name, why in skipped.items()})

    def figure(self, setting: str, name: str, unit: str, samples: list[float]) -> Figure:
        figure = Figure(setting, name, unit, samples)
        self.figures.append(figure)
        return figure

    def note(self, setting: str, text: str) -> None:
        self.notes.setdefault(setting, []).append(text)

    def find(self, setting: str, contender: str, op: str, *, prefix: bool = False) -> Result | None:
        """The result of ``contender`` (exact name, or any name starting with it) for ``op``."""
        for r in self.results:
            named = r.contender.startswith(contender) if prefix else r.contender == contender
            if r.setting == setting and named and r.op == op:
                return r
        return None

    def target(self, setting: str, label: str, value: float | None, goal: float, *,
               higher_is_better: bool = True) -> None:
        self.targets.append(Target(setting, label, value, goal, higher_is_better))

    def ratio_targets(self, setting: str) -> None:
        """Targets of one save/restore setting: ours against the fastest peer, the ceiling and CPU budgets."""
        is_s3 = setting.startswith("s3")
        goals = {"save": 1.2, "restore": 2.0}
        for op in ("save", "restore"):
            ours = self.find(setting, "cloudckpt", op, prefix=True)
            if ours is None:
                continue
            peers = [r for r in self.results if r.setting == setting and r.op == op
                     and not r.contender.startswith(("cloudckpt", "ceiling")) and "weights only" not in r.contender]
            if is_s3 and peers:
                best = max(peers, key=lambda r: r.mbps)
                self.target(setting, f"{op}: cloudckpt / fastest peer ({best.contender})", ours.mbps / best.mbps,
                            goals[op])
            ceiling = self.find(setting, "ceiling", op, prefix=True)
            if ceiling is not None and is_s3:
                self.target(setting, f"{op}: cloudckpt / raw ceiling", ours.mbps / ceiling.mbps, 0.9)
            elif ceiling is not None:
                self.note(setting, f"{op}: cloudckpt reaches {ours.mbps / ceiling.mbps:.2f}x the raw ceiling")
            if is_s3:
                self.target(setting, f"{op}: cloudckpt client CPU-s per GiB", ours.client_cpu_per_gib,
                            1.0 if op == "save" else 0.8, higher_is_better=False)
        if not is_s3:
            for op, peer, goal in (("save", "torch.save / torch.load", 1.2),
                                   ("restore", "torch.save / torch.load", 2.0),
                                   ("restore", "torch.save / torch.load(mmap=True)", 0.5)):
                ours, base = self.find(setting, "cloudckpt", op, prefix=True), self.find(setting, peer, op)
                if ours and base:
                    self.target(setting, f"{op}: cloudckpt / {peer}", ours.mbps / base.mbps, goal)
            torch_save, ceiling = self.find(setting, "torch.save / torch.load", "save"), \
                self.find(setting, "ceiling", "save", prefix=True)
            if torch_save and ceiling:
                self.note(setting, f"the raw write ceiling is {ceiling.mbps / torch_save.mbps:.2f}x torch.save here: "
                                   "no writer that stores every byte can save faster than that")

    def fresh(self, name: str) -> Path:
        return self.workdir / name

    @staticmethod
    def load() -> float:
        return load_average()
