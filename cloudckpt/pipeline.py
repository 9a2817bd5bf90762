"""The background half of an async save: one worker, back-pressure, errors that are never lost.

At most one save is in flight.  A new save first waits for the previous one
(so host memory holds one snapshot, not a queue of them).  An error of a
background save is raised by the next ``save()``, ``wait()`` or ``close()``
of the manager, and by the handle's ``result()``.  At interpreter exit, an
in-flight save is completed before Python tears down its thread pools; a
second Ctrl-C during that wait abandons it (the log says what that leaves)
and ends the process at once, like a kill.  A process killed outright leaves
no visible checkpoint, because the manifest is only written at the very end.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import weakref
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Callable, Generic, TypeVar

log = logging.getLogger(__name__)
T = TypeVar("T")

_live_savers: "weakref.WeakSet[BackgroundSaver]" = weakref.WeakSet()


def _drain_at_exit() -> None:
    for saver in list(_live_savers):
        saver.drain_quietly()


# Runs before concurrent.futures refuses new work at shutdown (the writer uses thread pools):
# threading's exit hooks run in reverse order of registration, so concurrent.futures.thread must
# have registered its own first.  It is imported lazily by ``concurrent.futures`` otherwise, and then
# its hook would stop the pools under a save in flight ("cannot schedule new futures after
# interpreter shutdown").
import concurrent.futures.thread  # noqa: E402,F401  (registers concurrent.futures' exit hook now)

_register = getattr(threading, "_register_atexit", None)
if _register is not None:
    _register(_drain_at_exit)
else:  # pragma: no cover - other Pythons
    import atexit

    atexit.register(_drain_at_exit)


def _exit_now(status: int) -> None:
    """Flush what was logged and printed, then end the process without running further clean-up."""
    for handler in logging.getLogger().handlers:
        handler.flush()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(status)


def _is_shutdown_refusal(exc: BaseException) -> bool:
    """Whether ``exc`` is a thread pool refusing work because the interpreter is shutting down."""
    return isinstance(exc, RuntimeError) and "interpreter shutdown" in str(exc)


#: Nice value of background save threads (and the upload threads they start, which inherit it).
BACKGROUND_NICENESS = 19


def _yield_cpu_to_training() -> None:
    """Lower this thread's scheduling priority (Linux: per thread), so training keeps its cores."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), BACKGROUND_NICENESS)
    except (AttributeError, OSError):  # other platforms, or not permitted: run at normal priority
        pass


class SaveHandle(Generic[T]):
    """What an async ``save()`` returns: ``result()`` blocks until the checkpoint is committed."""

    def __init__(self, future: "Future[T]", name: str) -> None:
        self._future = future
        self.name = name

    def done(self) -> bool:
        return self._future.done()

    def result(self, timeout: float | None = None) -> T:
        """The committed checkpoint's info; raises the save's error if it failed."""
        return self._future.result(timeout)

    def __repr__(self) -> str:
        state = "done" if self.done() else "in flight"
        return f"SaveHandle({self.name!r}, {state})"


class BackgroundSaver:
    """Runs one save job at a time on its own thread."""

    def __init__(self, explain_abandoned: Callable[[str], str] | None = None) -> None:
        self._current: Future | None = None
        self._current_name: str | None = None
        self._error: BaseException | None = None
        self._lock = threading.Lock()
        self._abandoned = False
        self._explain = explain_abandoned or (lambda name: f"nothing was committed: {name} does not exist")
        _live_savers.add(self)

    def submit(self, name: str, job: Callable[[], T]) -> SaveHandle[T]:
        """Start ``job`` in the background (after the previous job finished; raise its error first)."""
        self.wait()
        future: Future[T] = Future()

        def run() -> None:
            if not future.set_running_or_notify_cancel():
                return
            _yield_cpu_to_training()
            try:
                future.set_result(job())
            except BaseException as exc:  # surfaced on the caller's thread, never swallowed
                with self._lock:
                    self._error = self._error or exc
                if self._abandoned:  # already explained when the exit was forced; this is its echo
                    log.debug("abandoned save of %s stopped: %s", name, exc)
                elif _is_shutdown_refusal(exc):
                    log.error("save of %s abandoned at interpreter exit; %s", name, self._explain(name))
                else:
                    log.error("background save of %s failed: %s", name, exc)
                future.set_exception(exc)

        with self._lock:
            self._current = future
            self._current_name = name
        threading.Thread(target=run, name=f"cloudckpt-save-{name}", daemon=False).start()
        return SaveHandle(future, name)

    def wait(self, timeout: float | None = None) -> None:
        """Block until the in-flight job (if any) ends; raise the first unreported failure.

        Raises TimeoutError if ``timeout`` seconds pass first (the job goes on).
        """
        with self._lock:
            current = self._current
        if current is not None:
            try:
                current.result(timeout)
            except FutureTimeout as exc:
                raise TimeoutError(f"the save in flight did not finish within {timeout:.1f} s") from exc
            except KeyboardInterrupt:  # Ctrl-C on this (the main) thread, not the job's failure
                raise
            except BaseException:
                pass  # the job's own failure: raised below, once
        with self._lock:
            error, self._error = self._error, None
            self._current = None
        if error is not None:
            raise error

    def drain_quietly(self) -> None:
        """Finish in-flight work at interpreter exit; report a failure in the log only."""
        try:
            self.wait()
        except KeyboardInterrupt:
            # A second Ctrl-C while exit waits for the upload: say what giving up means, then end the
            # process at once, as a kill would, so that the save cannot commit after all.
            self._abandoned = True
            name = self._current_name or "the checkpoint in flight"
            log.error("save of %s abandoned by a second interrupt while it was uploading; %s",
                      name, self._explain(name))
            _exit_now(130)
        except BaseException as exc:
            log.error("checkpoint save in flight at exit failed: %s", exc)

    @property
    def busy(self) -> bool:
        with self._lock:
            return self._current is not None and not self._current.done()
