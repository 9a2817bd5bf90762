"""A zombie writer of an abandoned timeline never moves ``latest``/``best`` and is never restored.

Two processes: the zombie (zombie_worker.py) saved steps 100-300; the operator rolls back to 100
and a replacement saves 200 on the new timeline; then the zombie tries to save 400 and 500.  And
the race inside one process: a zombie that planned its save before the rollback and commits
after it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

from timeline_util import blank, loss, manager, name, restored, same, save_run, state

from cloudckpt import CheckpointManager, TimelineSuperseded
from cloudckpt.pointers import LATEST_POINTER, best_pointer_key, read_pointer
from cloudckpt.storage.faults import FaultyStorage

BEST = best_pointer_key("loss")


class _PointerWatch:
    """Every target latest.ckpt and the best pointer take, read as fast as the store answers."""

    def __init__(self, store) -> None:
        self.store, self.seen, self._stop = store, set(), threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            for key in (LATEST_POINTER, BEST):
                pointer = read_pointer(self.store, key)
                if pointer is not None:
                    self.seen.add((key, pointer.target, pointer.step))

    def __enter__(self) -> "_PointerWatch":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def test_zombie_process_never_moves_pointers_and_is_never_restored(cloud_root, tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(Path(__file__).parents[2]), str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")])}
    zombie = subprocess.Popen([sys.executable, str(Path(__file__).with_name("zombie_worker.py")), cloud_root.url,
                               cloud_root.cli_options[1], str(tmp_path)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=env)
    try:
        deadline = time.monotonic() + 120
        while not (tmp_path / "ready").exists():
            assert zombie.poll() is None and time.monotonic() < deadline, zombie.stderr.read() if zombie.poll() else ""
            time.sleep(0.05)
        store = cloud_root.store
        operator = CheckpointManager(store, monitor="loss", capture_rng=False)
        operator.rollback(to=100)
        replacement = manager(store, retention=None)
        replacement.restore(blank())
        save_run(replacement, (200,), "b")
        with _PointerWatch(store) as watch:
            (tmp_path / "go").touch()
            out, err = zombie.communicate(timeout=120)
        assert zombie.returncode == 0, err
    finally:
        zombie.kill()
    assert json.loads(out) == {"400": "TimelineSuperseded", "500": "TimelineSuperseded"}
    assert all(target == name(200) for _, target, _ in watch.seen), watch.seen   # never a zombie's
    got, target = restored(store)
    assert got == name(200) and same(target, state(200, "b"))
    assert manager(store).best().name == name(200)


class _PausingStore(FaultyStorage):
    """Holds the next manifest commit (create-only put of a top-level .ckpt) until released."""

    def __init__(self, inner) -> None:
        super().__init__(inner)
        self.reached, self.release = threading.Event(), threading.Event()
        self.armed = False

    def put(self, key, data, mode="overwrite"):
        if self.armed and mode == "create" and key.endswith(".ckpt") and "/" not in key:
            self.armed = False
            self.reached.set()
            assert self.release.wait(60)
        return super().put(key, data, mode)


def test_zombie_that_commits_after_the_rollback_stays_superseded(cloud_root):
    store = cloud_root.store
    paused = _PausingStore(store)
    zombie = manager(paused, retention=None)
    save_run(zombie, (100, 200, 300), "z")
    paused.armed = True
    errors = []
    thread = threading.Thread(target=lambda: errors.append(
        zombie.save(state(400, "z"), step=400, metrics={"loss": 0.0001})))
    thread.start()
    assert paused.reached.wait(60)                 # the zombie planned on the old timeline; its commit waits
    manager(store).rollback(to=100)
    with _PointerWatch(store) as watch:
        paused.release.set()
        thread.join(60)
    info = errors[0]
    assert info.superseded and info.pointers == ()  # committed, but superseded: it moved nothing
    assert not any(target == name(400) for _, target, _ in watch.seen), watch.seen
    assert restored(store)[0] == name(100)
    assert manager(store).best().name == name(100)
    assert name(400) not in {i.name for i in manager(store).list()}
    try:
        zombie.save(state(500, "z"), step=500, metrics={"loss": loss(500)})
    except TimelineSuperseded:
        pass
    else:
        raise AssertionError("the zombie saved again on an abandoned timeline")
