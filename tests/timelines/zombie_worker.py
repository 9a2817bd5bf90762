"""The old instance of a job that is not dead yet (a zombie), for test_zombie.py.

    python zombie_worker.py ROOT ENDPOINT_URL DIR

Saves steps 100, 200, 300 (run "a"), writes DIR/ready, waits for DIR/go, then tries to save
steps 400 and 500 and prints one JSON line: {step: "ok" or the error's type name}.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from timeline_util import loss, state

import cloudckpt


def main() -> None:
    root, endpoint, folder = sys.argv[1], sys.argv[2], Path(sys.argv[3])
    mgr = cloudckpt.CheckpointManager(root, monitor="loss", capture_rng=False,
                                      storage_options={"endpoint_url": endpoint})
    for step in (100, 200, 300):
        mgr.save(state(step, "z"), step=step, metrics={"loss": loss(step, "z")})
    (folder / "ready").touch()
    deadline = time.monotonic() + 120
    while not (folder / "go").exists():
        if time.monotonic() > deadline:
            sys.exit("never told to go on")
        time.sleep(0.05)
    outcome = {}
    for step in (400, 500):
        try:
            mgr.save(state(step, "z"), step=step, metrics={"loss": 0.0001})   # "better" than anything
            outcome[step] = "ok"
        except cloudckpt.CloudCkptError as exc:
            outcome[step] = type(exc).__name__
    print(json.dumps(outcome))


if __name__ == "__main__":
    main()
