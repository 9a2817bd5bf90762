"""Preemption notices -> a checkpoint at the next step boundary -> a documented exit.

Sources of notice:

* ``SIGTERM`` (Kubernetes eviction, GCE shutdown, ``docker stop``) and,
  optionally, ``SIGUSR1`` (SLURM's ``--signal``).  Handlers only set a flag
  (no I/O, no lock they could deadlock on: the notice is logged by the next
  reader); they chain to Python handlers installed before them (not to
  ``default_int_handler``, which would raise KeyboardInterrupt mid-step) and
  are removed on close.
* The EC2 spot interruption notice (IMDSv2: a token ``PUT``, then
  ``GET /latest/meta-data/spot/instance-action``, 404 until a notice exists).
* The GCE ``instance/preempted`` metadata key (``TRUE`` once preempted).

The pollers run on daemon threads; their endpoints are configurable, so tests
point them at a local fake metadata server.  What to do with a notice is the
callback's job (:class:`cloudckpt.CheckpointCallback` with ``preemption=``):
finish the step, save a checkpoint marked ``preemption``, and raise
:class:`Preempted`, which exits the process with :data:`EXIT_PREEMPTED`.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Any, Callable, Iterable

log = logging.getLogger(__name__)

#: Exit status after a preemption checkpoint was saved (EX_TEMPFAIL: "try again later").
EXIT_PREEMPTED = 75
EC2_METADATA = "http://169.254.169.254"
GCE_METADATA = "http://metadata.google.internal"


class Preempted(SystemExit):
    """Raised at a step boundary after the preemption checkpoint is durable; exits with EXIT_PREEMPTED."""

    def __init__(self, reason: str, code: int = EXIT_PREEMPTED) -> None:
        super().__init__(code)
        self.reason = reason

    def __str__(self) -> str:
        return f"preempted ({self.reason}); exiting with status {self.code}"


@dataclass(frozen=True)
class Notice:
    reason: str
    at: float


class PreemptionWatcher:
    """Collects preemption notices from signals and cloud metadata servers.

    >>> with PreemptionWatcher(signals=()) as watcher:
    ...     watcher.notice
    """

    def __init__(
        self,
        *,
        signals: Iterable[int] = (signal.SIGTERM,),
        ec2: bool = False,
        gce: bool = False,
        ec2_endpoint: str = EC2_METADATA,
        gce_endpoint: str = GCE_METADATA,
        poll_interval: float = 5.0,
        deadline: float = 25.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if deadline <= 0:
            raise ValueError(f"deadline must be positive, got {deadline}")
        self.deadline = deadline
        self.clock = clock
        self.poll_interval = poll_interval
        self._notice: Notice | None = None
        self._logged = False
        # Reentrant: a signal handler runs on the main thread between any two bytecodes, possibly
        # while that thread is inside notify() or notice (a second signal, or a custom source).
        self._lock = threading.RLock()
        self._stop = threading.Event()
        self._previous: dict[int, Any] = {}
        self._threads: list[threading.Thread] = []
        self._signals = tuple(signals)
        self._pollers: list[tuple[str, Callable[[], bool]]] = []
        if ec2:
            self._pollers.append(("ec2-spot-interruption", _Ec2Poller(ec2_endpoint).interrupted))
        if gce:
            self._pollers.append(("gce-preempted", _GcePoller(gce_endpoint).preempted))
        self._installed = False

    # -- lifecycle -------------------------------------------------------------------
    def install(self) -> "PreemptionWatcher":
        """Install signal handlers (main thread only) and start the metadata pollers."""
        if self._installed:
            return self
        if self._signals and threading.current_thread() is not threading.main_thread():
            raise ValueError(
                "PreemptionWatcher.install() must run on the main thread to install signal handlers; "
                "use PreemptionWatcher(signals=()) elsewhere (metadata pollers and notify() still work)"
            )
        for signum in self._signals:
            self._previous[signum] = signal.signal(signum, self._on_signal)
        self._stop = threading.Event()  # a fresh one: close() set the previous one
        for name, poll in self._pollers:
            thread = threading.Thread(target=self._poll_loop, args=(name, poll, self._stop), daemon=True,
                                      name=f"cloudckpt-{name}")
            thread.start()
            self._threads.append(thread)
        self._installed = True
        return self

    def close(self) -> None:
        """Restore the previous signal handlers and stop the pollers."""
        if not self._installed:
            return
        for signum, previous in self._previous.items():
            signal.signal(signum, previous if previous is not None else signal.SIG_DFL)
        self._previous.clear()
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=self.poll_interval + 1)
        self._threads.clear()
        self._installed = False

    def __enter__(self) -> "PreemptionWatcher":
        return self.install()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- notices ---------------------------------------------------------------------
    @property
    def notice(self) -> Notice | None:
        """The first notice received, or None."""
        with self._lock:
            notice = self._notice
            unlogged = notice is not None and not self._logged
            if unlogged:
                self._logged = True
        if unlogged:  # a signal handler recorded it; log here, outside the handler
            self._log(notice)
        return notice

    @property
    def requested(self) -> bool:
        return self.notice is not None

    def remaining(self) -> float:
        """Seconds left of the deadline since the notice (the full deadline if none yet)."""
        notice = self.notice
        return self.deadline if notice is None else max(0.0, self.deadline - (self.clock() - notice.at))

    def notify(self, reason: str) -> None:
        """Record a notice (what pollers call; usable by custom sources).  The first one wins."""
        notice = self._record(reason, logged=True)
        if notice is not None:
            self._log(notice)

    def _record(self, reason: str, *, logged: bool) -> Notice | None:
        """Store the first notice; return it if this call stored it."""
        notice = Notice(reason, self.clock())  # outside the lock: no calls while holding it
        with self._lock:
            if self._notice is not None:
                return None
            self._notice = notice
            self._logged = logged
        return notice

    def _log(self, notice: Notice) -> None:
        log.warning("preemption notice (%s, %.2f s ago): will checkpoint at the next step and exit",
                    notice.reason, max(0.0, self.clock() - notice.at))

    def _on_signal(self, signum: int, frame: Any) -> None:
        self._record(signal.Signals(signum).name, logged=False)
        previous = self._previous.get(signum)
        if callable(previous) and previous is not signal.default_int_handler:
            previous(signum, frame)

    def _poll_loop(self, name: str, poll: Callable[[], bool], stop: threading.Event) -> None:
        while not stop.is_set() and not self.requested:
            try:
                if poll():
                    self.notify(name)
                    return
            except Exception as exc:  # a metadata hiccup must never kill training
                log.debug("%s poll failed: %s", name, exc)
            stop.wait(self.poll_interval)


class _Ec2Poller:
    """IMDSv2: PUT a session token, then GET spot/instance-action (404 = no interruption)."""

    def __init__(self, endpoint: str, timeout: float = 2.0) -> None:
        self.endpoint = endpoint.rstrip("/")
        self.timeout = timeout
        self._token: str | None = None
        self._token_expiry = 0.0

    def _session_token(self) -> str:
        if self._token is None or time.monotonic() > self._token_expiry:
            request = urllib.request.Request(
                f"{self.endpoint}/latest/api/token", method="PUT",
                headers={"X-aws-ec2-metadata-token-ttl-seconds": "21600"},
            )
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                self._token = response.read().decode().strip()
            self._token_expiry = time.monotonic() + 21000
        return self._token

    def interrupted(self) -> bool:
        request = urllib.request.Request(
            f"{self.endpoint}/latest/meta-data/spot/instance-action",
            headers={"X-aws-ec2-metadata-token": self._session_token()},
        )
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                return response.status == 200
        except urllib.error.HTTPError as exc:
            if exc.code == 401:
                self._token = None  # token expired or revoked: fetch a new one next time
            if exc.code in (401, 404):
                return False
            raise


class _GcePoller:
    """GCE metadata server: instance/preempted is TRUE once the VM is being preempted."""

    def __init__(self, endpoint: str, timeout: float = 2.0) -> None:
        self.endpoint = endpoint.rstrip("/")
        self.timeout = timeout

    def preempted(self) -> bool:
        request = urllib.request.Request(
            f"{self.endpoint}/computeMetadata/v1/instance/preempted",
            headers={"Metadata-Flavor": "Google"},
        )
        with urllib.request.urlopen(request, timeout=self.timeout) as response:
            return response.read().decode().strip().upper() == "TRUE"
