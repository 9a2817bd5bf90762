"""Start instrumented training workers (see preempt_worker.py) and compare what they leave behind."""

from __future__ import annotations

import json
import multiprocessing
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch

import cloudckpt
from preempt_worker import CONFIG, STEPS_PER_EPOCH

_context: Any = None


def context() -> Any:
    """The multiprocessing fork-server context whose server has already imported torch and the worker."""
    global _context
    if _context is None:
        _context = multiprocessing.get_context("forkserver")
        # Python 3.11's fork server ignores the parent's sys.path when preloading, so preload what
        # the workers import from site-packages (the heavy part); each child then imports
        # preempt_worker itself.  A child also re-imports the parent's __main__ when that is a
        # script (the `pytest` command): preload pytest for it.
        preload = ["torch", "torch._dynamo", "numpy", "cloudckpt", "cloudckpt.storage.s3", "urllib.request"]
        _context.set_forkserver_preload(preload + (["pytest"] if "pytest" in sys.modules else []))
    return _context


@dataclass
class Outcome:
    label: str
    exitcode: int | None
    result: dict[str, Any] | None
    log: str
    ended: float

    def describe(self) -> str:
        return f"{self.label}: exit status {self.exitcode}\n--- worker log ---\n{self.log}--- end of log ---"

    @property
    def trace(self) -> dict[int, str]:
        assert self.result is not None, self.describe()
        return {int(step): digest for step, digest in (self.result["trace"] or {}).items()}


@dataclass
class Run:
    label: str
    root: str
    result_path: Path
    log_path: Path
    process: Any
    options: dict[str, Any] = field(default_factory=dict)

    def wait(self, timeout: float = 120.0) -> Outcome:
        self.process.join(timeout)
        if self.process.is_alive():
            self.process.kill()
            self.process.join(10)
            raise AssertionError(f"{self.label} did not finish within {timeout} s\n{_read(self.log_path)}")
        ended = time.time()
        result = json.loads(self.result_path.read_text()) if self.result_path.exists() else None
        return Outcome(self.label, self.process.exitcode, result, _read(self.log_path), ended)


def _read(path: Path) -> str:
    return path.read_text(errors="replace") if path.exists() else "(no log)\n"


def start(label: str, root: str, workdir: Path, **options: Any) -> Run:
    """Fork a worker training into ``root``; ``options`` as preempt_worker.main reads them."""
    workdir.mkdir(parents=True, exist_ok=True)
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", label)
    result, log = workdir / f"{slug}.json", workdir / f"{slug}.log"
    for path in (result, log):
        path.unlink(missing_ok=True)
    import preempt_worker

    process = context().Process(target=preempt_worker.main, args=(root, str(result), str(log), options),
                                name=f"worker-{slug}", daemon=True)
    process.start()
    return Run(label, root, result, log, process, options)


def run(label: str, root: str, workdir: Path, timeout: float = 120.0, **options: Any) -> Outcome:
    return start(label, root, workdir, **options).wait(timeout)


# -- the schedule of the test run ----------------------------------------------------------------
def step_of(name: str) -> int:
    """The training step a checkpoint name of the test run stands for."""
    match = re.fullmatch(r"checkpoint_step_(\d{8})\.ckpt", name)
    if match:
        return int(match.group(1))
    match = re.fullmatch(r"checkpoint_epoch_(\d{4})\.ckpt", name)
    assert match, name
    return int(match.group(1)) * STEPS_PER_EPOCH


def step_name(step: int) -> str:
    return f"checkpoint_step_{step:08d}.ckpt"


def epoch_name(epoch: int) -> str:
    return f"checkpoint_epoch_{epoch:04d}.ckpt"


# -- comparing runs --------------------------------------------------------------------------------
def assert_same_tree(a: Any, b: Any, path: str = "state") -> None:
    """Equal structure, equal JSON values, and tensors equal bit for bit (same dtype and shape)."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        assert isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor), f"{path}: tensor vs non-tensor"
        assert a.dtype == b.dtype and a.shape == b.shape, f"{path}: {a.dtype}{tuple(a.shape)} vs {b.dtype}{tuple(b.shape)}"
        assert torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8)), f"{path}: bytes differ"
    elif isinstance(a, Mapping):
        assert isinstance(b, Mapping), f"{path}: mapping vs {type(b).__name__}"
        assert sorted(map(str, a)) == sorted(map(str, b)), f"{path}: keys {sorted(map(str, a))} vs {sorted(map(str, b))}"
        for key in a:
            assert_same_tree(a[key], b[key], f"{path}.{key}")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), f"{path}: sequences differ in length"
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same_tree(x, y, f"{path}[{i}]")
    else:
        assert a == b, f"{path}: {a!r} != {b!r}"


def load_latest(root: str, storage_options: Mapping[str, Any] | None = None) -> tuple[dict[str, Any], Any]:
    with cloudckpt.CheckpointManager(root, storage_options=storage_options) as manager:
        return manager.load("latest")


def checkpoints(root: str, storage_options: Mapping[str, Any] | None = None) -> list[Any]:
    with cloudckpt.CheckpointManager(root, storage_options=storage_options) as manager:
        return manager.list()


def assert_trace_follows(reference: Outcome, outcome: Outcome) -> None:
    """After every step ``outcome`` took, its whole state equals the reference's after that step."""
    ref = reference.trace
    for step in sorted(outcome.trace):
        assert outcome.trace[step] == ref.get(step), (
            f"{outcome.label}: the training state after step {step} differs from the uninterrupted run's "
            f"(first divergent step)\n{outcome.describe()}")


def assert_bit_identical_end(reference: Outcome, outcome: Outcome, root: str, reference_root: str,
                             storage_options: Mapping[str, Any] | None = None,
                             reference_options: Mapping[str, Any] | None = None) -> None:
    """The run ended where the reference did, with the same in-memory state and the same final checkpoint."""
    assert outcome.result is not None and reference.result is not None, outcome.describe()
    assert outcome.result["step"] == reference.result["step"] == CONFIG["steps"], outcome.describe()
    assert outcome.result["weights_sha256"] == reference.result["weights_sha256"], outcome.describe()
    assert outcome.result["state_sha256"] == reference.result["state_sha256"], outcome.describe()
    ours, our_info = load_latest(root, storage_options)
    theirs, their_info = load_latest(reference_root, reference_options)
    assert our_info.step == their_info.step == CONFIG["steps"]
    assert set(ours) >= {"model", "optimizer", "scheduler", "sampler", "progress"}, sorted(ours)
    assert_same_tree(ours, theirs, "final checkpoint")
