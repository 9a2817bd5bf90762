"""Wall time, client CPU (``getrusage`` of this process) and server CPU of one call."""

from __future__ import annotations

import os
import resource
import statistics
import subprocess
import time
from dataclasses import dataclass, field
from typing import Any, Callable

GiB = 1024**3
_TICK = os.sysconf("SC_CLK_TCK")


def process_cpu(pid: int) -> float:
    """CPU seconds (user + system) a live process has used so far, from /proc."""
    with open(f"/proc/{pid}/stat") as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICK


def own_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def load_average() -> float:
    return os.getloadavg()[0]


@dataclass
class Sample:
    seconds: float
    client_cpu: float
    server_cpu: float | None
    load: float


def measure(fn: Callable[[], Any], server_pids: tuple[int, ...] = ()) -> Sample:
    """Run ``fn`` once; its wall seconds, this process's CPU seconds and the servers' CPU seconds."""
    servers_before = sum(process_cpu(p) for p in server_pids)
    cpu_before = own_cpu()
    start = time.perf_counter()
    fn()
    seconds = time.perf_counter() - start
    client = own_cpu() - cpu_before
    server = sum(process_cpu(p) for p in server_pids) - servers_before if server_pids else None
    return Sample(seconds, client, server, load_average())


@dataclass
class Result:
    """Samples of one contender doing one operation on ``nbytes`` of state."""

    setting: str
    contender: str
    op: str
    nbytes: int
    samples: list[Sample] = field(default_factory=list)
    note: str = ""

    @property
    def seconds(self) -> float:
        return statistics.median(s.seconds for s in self.samples)

    @property
    def mbps(self) -> float:
        return self.nbytes / 1e6 / self.seconds

    def rates(self) -> list[float]:
        return [self.nbytes / 1e6 / s.seconds for s in self.samples]

    @property
    def client_cpu_per_gib(self) -> float:
        return statistics.median(s.client_cpu for s in self.samples) / (self.nbytes / GiB)

    @property
    def server_cpu_per_gib(self) -> float | None:
        values = [s.server_cpu for s in self.samples if s.server_cpu is not None]
        return statistics.median(values) / (self.nbytes / GiB) if values else None

    def row(self) -> dict[str, Any]:
        return {"setting": self.setting, "contender": self.contender, "op": self.op, "nbytes": self.nbytes,
                "median_s": self.seconds, "median_MBps": self.mbps, "MBps": self.rates(),
                "client_cpu_s_per_gib": self.client_cpu_per_gib, "server_cpu_s_per_gib": self.server_cpu_per_gib,
                "load": [s.load for s in self.samples], "note": self.note,
                "samples": [vars(s) for s in self.samples]}


@dataclass
class Target:
    setting: str
    label: str
    value: float | None
    goal: float
    higher_is_better: bool = True
    reason: str = ""

    @property
    def met(self) -> bool:
        if self.value is None:
            return False
        return self.value >= self.goal if self.higher_is_better else self.value <= self.goal

    def row(self) -> dict[str, Any]:
        return {**vars(self), "met": self.met}


def fsync_file(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: str) -> None:
    """fsync every file under ``root`` (for writers that do not fsync themselves)."""
    for folder, _, files in os.walk(root):
        for name in files:
            fsync_file(os.path.join(folder, name))


def git_revision() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
