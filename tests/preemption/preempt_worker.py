"""The training process of the preemption tests: examples/spot_training.py's worker, instrumented.

Workers are forked from a ``multiprocessing`` fork server that has already imported torch (a fresh
interpreter spends seconds importing torch and torch._dynamo; a fork takes milliseconds).  Each one
is still a separate process: it gets a real SIGTERM, runs the library's handlers, and its exit
status is whatever the worker's ``SystemExit`` says, after the interpreter's thread shutdown (the
same path that drains background saves at a normal exit).

Instrumentation, all inside the worker:

* :class:`WatchedStore` wraps the checkpoint store.  It records every committed manifest in order,
  flags any write that starts while a manifest commit is in progress (two saves at once), and can
  hold a chosen checkpoint's commit until the preemption notice has arrived, so that the notice is
  guaranteed to land while that upload is in flight (no timing luck involved).
* :class:`WaitForNotice` pauses the loop at a step until a metadata poller has seen the notice the
  test switches on (it calls the fake metadata server's ``/_test/ready`` so the test knows when).
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any, Iterable, Mapping

import torch
import torch._dynamo  # noqa: F401  (preloaded in the fork server: torch.optim imports it on first use)

import cloudckpt
from cloudckpt.pointers import is_pointer_key
from cloudckpt.preemption import EC2_METADATA, GCE_METADATA, PreemptionWatcher
from cloudckpt.storage.base import Buffer, MultipartUpload, ObjectInfo, PendingUpload, PutMode, Storage

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "examples" / "spot_training.py"


def load_example() -> Any:
    """examples/spot_training.py as a module (examples/ is not a package)."""
    module = sys.modules.get("spot_training")
    if module is None:
        spec = importlib.util.spec_from_file_location("spot_training", EXAMPLE)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules["spot_training"] = module
        spec.loader.exec_module(module)
    return module


spot = load_example()

#: The training run every preemption test uses: 18 steps an epoch (288 samples, batches of 16),
#: a periodic save every 8 steps, 50 steps in all (so the run ends mid-epoch, and no periodic save
#: falls on an epoch end).
CONFIG = dict(steps=50, save_every=8, batch_size=16, n_train=288)
STEPS_PER_EPOCH = CONFIG["n_train"] // CONFIG["batch_size"]


def is_manifest(key: str) -> bool:
    return "/" not in key and key.endswith(".ckpt") and not is_pointer_key(key)


class WatchedStore(Storage):
    """Delegates to ``inner``; records commits, detects overlapping saves, can hold one commit."""

    def __init__(self, inner: Storage, *, hold: Iterable[str] = (), watcher: PreemptionWatcher | None = None,
                 hold_timeout: float = 60.0) -> None:
        self.inner = inner
        self.url = inner.url
        self.min_part_size = inner.min_part_size
        self.default_part_size = inner.default_part_size
        self.supports_conditional_writes = inner.supports_conditional_writes
        self.hold = set(hold)
        self.watcher = watcher
        self.hold_timeout = hold_timeout
        self.committed: list[str] = []
        self.held: list[str] = []
        self.overlaps: list[str] = []
        self._committing: str | None = None
        self._lock = threading.Lock()

    def _check_no_commit(self, key: str) -> None:
        with self._lock:
            if self._committing is not None:
                self.overlaps.append(f"{key} written while {self._committing} was being committed")

    def put(self, key: str, data: Buffer, mode: PutMode = "overwrite") -> ObjectInfo:
        if not is_manifest(key):
            self._check_no_commit(key)
            return self.inner.put(key, data, mode)
        with self._lock:
            if self._committing is not None:
                self.overlaps.append(f"{key} committed while {self._committing} was being committed")
            self._committing = key
        try:
            if key in self.hold:  # keep this upload in flight until the preemption notice arrived
                assert self.watcher is not None, "hold needs the watcher"
                if not wait_for_notice(self.watcher, self.hold_timeout):
                    raise TimeoutError(f"no preemption notice within {self.hold_timeout} s")
                self.held.append(key)
            info = self.inner.put(key, data, mode)
            self.committed.append(key)
            return info
        finally:
            with self._lock:
                self._committing = None

    def multipart(self, key: str, *args: Any, **kwargs: Any) -> MultipartUpload:
        self._check_no_commit(key)
        return self.inner.multipart(key, *args, **kwargs)

    # Everything else passes straight through (with whatever arguments the protocol grows).
    def get(self, *args: Any, **kwargs: Any) -> bytes:
        return self.inner.get(*args, **kwargs)

    def head(self, *args: Any, **kwargs: Any) -> ObjectInfo:
        return self.inner.head(*args, **kwargs)

    def list(self, *args: Any, **kwargs: Any) -> list[ObjectInfo]:
        return self.inner.list(*args, **kwargs)

    def delete(self, *args: Any, **kwargs: Any) -> None:
        self.inner.delete(*args, **kwargs)

    def copy(self, *args: Any, **kwargs: Any) -> ObjectInfo:
        return self.inner.copy(*args, **kwargs)

    def mark_expired(self, *args: Any, **kwargs: Any) -> None:
        self.inner.mark_expired(*args, **kwargs)

    def list_pending_uploads(self, *args: Any, **kwargs: Any) -> list[PendingUpload]:
        return self.inner.list_pending_uploads(*args, **kwargs)

    def abort_pending_upload(self, *args: Any, **kwargs: Any) -> None:
        self.inner.abort_pending_upload(*args, **kwargs)

    def close(self) -> None:
        self.inner.close()

    def __getattr__(self, name: str) -> Any:  # optional extras of the wrapped backend
        if name == "inner":
            raise AttributeError(name)
        return getattr(self.inner, name)


class WaitForNotice(cloudckpt.Callback):
    """At step ``at``: tell the test (GET ready_url), then wait until the watcher has a notice."""

    def __init__(self, at: int, ready_url: str, watcher: PreemptionWatcher, timeout: float = 60.0) -> None:
        self.at = at
        self.ready_url = ready_url
        self.watcher = watcher
        self.timeout = timeout

    def on_step_end(self, trainer: Any, step: int, logs: Mapping[str, float]) -> None:
        if step != self.at:
            return
        urllib.request.urlopen(f"{self.ready_url}?step={step}", timeout=10).read()
        if not wait_for_notice(self.watcher, self.timeout):
            raise TimeoutError(f"no preemption notice within {self.timeout} s of step {step}")


def wait_for_notice(watcher: PreemptionWatcher, timeout: float) -> bool:
    """Poll ``watcher.requested`` (public API) until it is true or ``timeout`` passes."""
    deadline = time.monotonic() + timeout
    tick = threading.Event()
    while not watcher.requested:
        if time.monotonic() > deadline:
            return False
        tick.wait(0.005)
    return True


def main(root: str, result: str, log: str, options: Mapping[str, Any]) -> None:
    """The fork-server target: run one worker with ``options`` and exit with its status."""
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    os.environ.update(options.get("env", {}))
    import logging

    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        force=True)

    watcher = PreemptionWatcher(
        ec2="ec2" in options, gce="gce" in options, poll_interval=options.get("poll_interval", 0.05),
        ec2_endpoint=options.get("ec2", EC2_METADATA), gce_endpoint=options.get("gce", GCE_METADATA),
    )
    stores: list[WatchedStore] = []

    def wrap(store: Storage) -> Storage:
        stores.append(WatchedStore(store, hold=options.get("hold", ()), watcher=watcher))
        return stores[-1]

    extra = []
    if "wait_at" in options:
        extra.append(WaitForNotice(options["wait_at"], options["ready_url"], watcher))
    code = spot.run_worker(
        root, **CONFIG, preempt_at=options.get("preempt_at"), phase=options.get("phase", "after-save"),
        result_path=result, storage_options=options.get("storage_options"), wrap_store=wrap,
        watcher=watcher, extra_callbacks=tuple(extra), trace=True, quiet=True,
    )
    summary = json.loads(Path(result).read_text())
    store = stores[0]
    summary.update(committed=store.committed, held=store.held, overlaps=store.overlaps,
                   handler_after=_handler_name(), ended=time.time())
    Path(result).write_text(json.dumps(summary))
    sys.exit(code)


def _handler_name() -> str:
    """What SIGTERM's handler is once the run is over (the watcher must have restored it)."""
    import signal

    handler = signal.getsignal(signal.SIGTERM)
    return getattr(handler, "name", None) or repr(handler)


def nested_signal_while_recording() -> None:
    """Fork-server target: a SIGTERM lands while the main thread is recording another notice.

    The watcher's clock raises SIGTERM the first time it is read, i.e. inside ``notify()``; the
    handler runs right there on the main thread.  A non-reentrant lock held across that point
    deadlocks (and then swallows every later SIGTERM too, since each handler blocks on the lock).
    """
    import signal

    fired: list[bool] = []

    def clock() -> float:
        if not fired:
            fired.append(True)
            signal.raise_signal(signal.SIGTERM)
        return time.monotonic()

    watcher = PreemptionWatcher(clock=clock).install()
    watcher.notify("maintenance-event")
    notice = watcher.notice
    watcher.close()
    sys.exit(0 if notice is not None and notice.reason in ("SIGTERM", "maintenance-event") else 1)

