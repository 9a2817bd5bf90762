"""The process test_kill_real.py kills: resume from the newest checkpoint, then save forever.

It appends one line per event to a progress file (single ``os.write`` calls on an O_APPEND
descriptor, so a kill never leaves half a line):

    started <step resumed from, or 0>
    committed <step>        a save of that step returned, so the checkpoint is durable
    error <message>         anything unexpected (the test fails on it)
"""

from __future__ import annotations

import datetime as _dt
import logging
import os
import traceback
from typing import Any

import torch

KiB = 1024
CHUNK = 256 * KiB


def state(step: int) -> dict:
    """~3 MiB: 2 MiB new in every step (8 chunks), 1 MiB the same in all (4 chunks, deduplicated)."""
    g = torch.Generator().manual_seed(step)
    stable = torch.Generator().manual_seed(0)
    return {"model": {"big": torch.randn(512 * KiB, generator=g), "stable": torch.randn(256 * KiB, generator=stable),
                      "small": torch.arange(step, step + 100, dtype=torch.int64)},
            "progress": {"step": step}}


def blank() -> dict:
    return {"model": {"big": torch.zeros(512 * KiB), "stable": torch.zeros(256 * KiB),
                      "small": torch.zeros(100, dtype=torch.int64)}, "progress": {"step": -1}}


def manager(root: str, endpoint_url: str | None, *, async_save: bool):
    import cloudckpt

    return cloudckpt.CheckpointManager(
        root,
        storage_options={"endpoint_url": endpoint_url} if endpoint_url else None,
        retention=cloudckpt.KeepLastN(2),
        cleanup=cloudckpt.SweepConfig(grace=_dt.timedelta(0)),  # one writer at a time: safe to sweep at once
        transfer=cloudckpt.TransferConfig(chunk_size=CHUNK, pack_threshold=64 * KiB, concurrency=4),
        capture_rng=False, async_save=async_save,
    )


def main(options: dict[str, Any]) -> None:
    fd = os.open(options["progress"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def say(line: str) -> None:
        os.write(fd, (line.replace("\n", " ") + "\n").encode())

    try:
        os.environ.update(options.get("env", {}))
        logging.basicConfig(filename=options["log"], level=logging.INFO)
        torch.set_num_threads(1)
        mgr = manager(options["root"], options.get("endpoint_url"), async_save=options["async_save"])
        info = mgr.restore(blank())
        step = info.step + 1 if info else 1
        say(f"started {step - 1}")
        while True:
            mgr.save(state(step), step=step)
            say(f"committed {step - 1 if options['async_save'] else step}")  # async: the previous one is durable
            step += 1
    except BaseException as exc:  # noqa: BLE001 - reported to the test, which fails on it
        say(f"error {type(exc).__name__}: {exc} {traceback.format_exc()[-500:]}")
        raise
