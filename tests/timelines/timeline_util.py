"""Helpers of the timeline suite: deterministic states, a manager factory, store URLs for the CLI."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import torch

from cloudckpt import CheckpointManager, KeepLastN
from cloudckpt.storage import Storage


def name(step: int) -> str:
    return f"checkpoint_step_{step:08d}.ckpt"


def state(step: int, run: str = "a") -> dict:
    """A state unique to (step, run): its bytes tell which run saved it."""
    g = torch.Generator().manual_seed(step * 131 + ord(run))
    return {"model": {"w": torch.randn(3000, generator=g), "b": torch.randn(8, generator=g)},
            "progress": {"step": step, "run": run}}


def blank() -> dict:
    return {"model": {"w": torch.zeros(3000), "b": torch.zeros(8)}, "progress": {"step": -1, "run": ""}}


def same(a: dict, b: dict) -> bool:
    return (torch.equal(a["model"]["w"], b["model"]["w"]) and torch.equal(a["model"]["b"], b["model"]["b"])
            and a["progress"] == b["progress"])


def manager(store: Storage, **options) -> CheckpointManager:
    options.setdefault("retention", KeepLastN(3))
    return CheckpointManager(store, capture_rng=False, monitor="loss", **options)


def loss(step: int, run: str = "a") -> float:
    return 1.0 / step if run == "a" else 0.5 / step


def save_run(mgr: CheckpointManager, steps, run: str = "a") -> None:
    for step in steps:
        mgr.save(state(step, run), step=step, metrics={"loss": loss(step, run)})


def restored(store: Storage, which="latest") -> tuple[str | None, dict]:
    """What a new process restores: (name, state)."""
    target = blank()
    info = manager(store).restore(target, which=which)
    return (None if info is None else info.name), target


@dataclass
class Result:
    """What one ``cloudckpt`` command printed."""

    returncode: int
    stdout: str
    stderr: str

    def json(self) -> Any:
        return json.loads(self.stdout)

    def __str__(self) -> str:
        return f"exit {self.returncode}\nstdout:\n{self.stdout}\nstderr:\n{self.stderr}"


def invoke(*args: str) -> Result:
    """Run ``cloudckpt ARGS`` in this process (click's runner); an unhandled exception fails the test."""
    from click.testing import CliRunner

    from cloudckpt.cli import cli

    result = CliRunner().invoke(cli, list(args), prog_name="cloudckpt")
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return Result(result.exit_code, result.stdout, result.stderr)
