"""Helpers for the command-line tests: run ``python -m cloudckpt.cli`` as real subprocesses,
and build small runs with CheckpointManager on any root."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from dataclasses import dataclass, field
from typing import Any

import torch

import cloudckpt

#: (step, val_loss): best is step 20, latest is step 30.
STEPS = [(10, 0.9), (20, 0.5), (30, 0.7)]
NAMES = {step: f"checkpoint_step_{step:08d}.ckpt" for step, _ in STEPS}
# Small chunks so that every checkpoint has several, and the frozen embedding deduplicates.
TRANSFER = cloudckpt.TransferConfig(chunk_size=8192, pack_threshold=2048)


def cli_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "cloudckpt.cli", *args]


@dataclass
class Result:
    args: tuple[str, ...]
    returncode: int
    stdout: str
    stderr: str

    def json(self) -> Any:
        return json.loads(self.stdout)

    def __str__(self) -> str:
        return f"cloudckpt {' '.join(self.args)} -> {self.returncode}\n--stdout--\n{self.stdout}\n--stderr--\n{self.stderr}"


def run_many(*commands: tuple[str, ...], cwd: str | None = None, timeout: float = 120) -> list[Result]:
    """Run several CLI commands at once (each one pays for importing torch), in order of the arguments."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "COLUMNS": "200"}
    procs = [
        (args, subprocess.Popen(cli_command(*args), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                stdin=subprocess.DEVNULL, text=True, cwd=cwd, env=env))
        for args in commands
    ]
    results = []
    for args, proc in procs:
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
        results.append(Result(tuple(args), proc.returncode, out, err))
    return results


def run(*args: str, cwd: str | None = None) -> Result:
    return run_many(tuple(args), cwd=cwd)[0]


def invoke(*args: str) -> Result:
    """Run the same command in this process (click's CliRunner): no torch import to pay for.

    The subprocess tests prove the real entry point; this runs the many other checks fast.
    An exception the command did not turn into an exit status is re-raised, so it fails the test.
    """
    from click.testing import CliRunner

    from cloudckpt.cli import cli

    result = CliRunner().invoke(cli, list(args), prog_name="cloudckpt")
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return Result(tuple(args), result.exit_code, result.stdout, result.stderr)


def assert_one_line_error(result: Result, *, code: int | None = None) -> None:
    assert result.returncode != 0, str(result)
    if code is not None:
        assert result.returncode == code, str(result)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, str(result)
    assert lines[0].startswith("cloudckpt: error: "), str(result)
    assert "Traceback" not in result.stderr


@dataclass
class Run:
    """A run saved by CheckpointManager: its root URL, options and the tensors saved at each step."""

    root: str
    options: dict[str, Any]
    models: dict[int, dict[str, torch.Tensor]] = field(default_factory=dict)

    def cli_options(self) -> list[str]:
        url = self.options.get("endpoint_url")
        return ["--endpoint-url", url] if url else []


def make_model() -> torch.nn.Module:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Embedding(64, 16), torch.nn.Flatten(), torch.nn.Linear(16 * 4, 8))
    model[0].weight.requires_grad_(False)  # frozen: its chunks are shared by every checkpoint
    return model


def make_run(root: str, *, storage_options: dict[str, Any] | None = None, pin: int | None = 10,
             compression: str = "none") -> Run:
    """Save STEPS under ``root`` with val_loss tracking; pin step ``pin``; chunks zstd-compressed if asked."""
    transfer = dataclasses.replace(TRANSFER, compression=compression)
    model = make_model()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1, momentum=0.9)
    result = Run(root, dict(storage_options or {}))
    with cloudckpt.CheckpointManager(root, monitor="val_loss", mode="min", transfer=transfer,
                                     storage_options=storage_options) as mgr:
        for step, loss in STEPS:
            model(torch.randint(0, 64, (2, 4))).square().mean().backward()
            opt.step()
            opt.zero_grad()
            mgr.save({"model": model, "optimizer": opt, "extra": {"note": "cli test"}},
                     step=step, epoch=step // 10, metrics={"val_loss": loss})
            result.models[step] = {k: v.detach().clone() for k, v in model.state_dict().items()}
        if pin is not None:
            mgr.pin(NAMES[pin])
    return result
