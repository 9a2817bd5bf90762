"""A fault-injecting HTTP proxy for S3 and GCS clients: a threaded loopback server in front of
moto or fake-gcs-server.

Point a client's ``endpoint_url`` at :attr:`FaultProxy.endpoint_url` (``flavor="gcs"`` for the
GCS JSON API: JSON error bodies, resumable-upload ``Location`` headers rewritten to the proxy).
Each request is either forwarded to the upstream server and its answer relayed, or answered
with a fault: for a seeded share of requests (``fault_rate``), at the N-th request
(``schedule={N: mode}``), or at the first requests a predicate picks (``rules``):

``503``          503 SlowDown (GCS: backendError), with ``Retry-After: 1``
``500``          500 InternalError
``429``          429 TooManyRequests, with ``Retry-After: 1``
``reset``        the connection is reset (RST) before the request reaches the upstream
``reset_body``   the connection is reset halfway through reading the request body (not applied)
``reset_after``  the request is applied upstream, then the connection is reset: the client
                 cannot know it succeeded (the lost-response case retries must handle)
``reset_mid_response``  applied upstream; the status line, headers and half the body are sent,
                 then the connection is reset
``truncate``     applied upstream; the full Content-Length is announced, half the body sent,
                 then the connection is closed cleanly (FIN)
``slow``         the answer is held past the client's read timeout; the request reaches the
                 upstream only afterwards (late, while the client has moved on to its retry)
``kill_before`` / ``kill_after``  SIGKILL :attr:`FaultProxy.victim` (a process id) before the
                 request reaches the upstream, or after it was applied there; then reset

``strip_conditions`` makes the upstream a store that ignores conditional writes: the
``If-None-Match`` / ``If-Match`` headers and the ``ifGenerationMatch`` /
``ifGenerationNotMatch`` / ``ifMetagenerationMatch`` query parameters are removed before
forwarding.  ``no_upload_listing`` answers S3 ListMultipartUploads with 501 NotImplemented.

``always`` answers every request (or, with ``writes_only``, every PUT/POST/DELETE) with one
permanent error instead: ``403`` AccessDenied, ``invalid_key`` (InvalidAccessKeyId) or
``signature`` (SignatureDoesNotMatch).  The last two echo the access key id and signature of
the request into the error body, as S3 does, so tests can check that nothing passes them on.

``rewrite`` edits the headers of forwarded answers: ``rewrite(method, path, headers)`` returns the
headers to send instead, as a store that reports something else would (a different checksum, none).

Every request is recorded (method, path, outcome) in :attr:`FaultProxy.log`.
"""

from __future__ import annotations

import http.client
import json
import os
import random
import re
import signal
import socket
import struct
import threading
import time
from collections import Counter
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable, Self
from urllib.parse import parse_qsl, urlencode, urlparse, urlsplit, urlunsplit
from xml.sax.saxutils import escape

FAULT_MODES = ("503", "500", "429", "reset", "reset_body", "reset_after", "reset_mid_response", "truncate",
               "slow", "kill_before", "kill_after")
DEFAULT_WEIGHTS = {"503": 3, "500": 2, "429": 2, "reset": 2, "reset_after": 2, "slow": 1}
#: Every fault that a client should absorb by retrying (the storms of both backends use these).
ALL_TRANSIENT_WEIGHTS = {"503": 3, "500": 2, "429": 2, "reset": 2, "reset_body": 2, "reset_after": 2,
                         "reset_mid_response": 2, "truncate": 2, "slow": 1}
_CONDITION_HEADERS = {"if-none-match", "if-match"}
_CONDITION_PARAMS = {"ifGenerationMatch", "ifGenerationNotMatch", "ifMetagenerationMatch",
                     "ifMetagenerationNotMatch", "ifSourceGenerationMatch"}
_RETRY_AFTER = {"503", "429"}
_GCS_REASONS = {"503": "backendError", "500": "internalError", "429": "rateLimitExceeded", "403": "forbidden"}
_HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "content-length", "proxy-connection", "te",
               "trailer", "upgrade"}
_ERRORS = {
    "503": (503, "SlowDown", "Please reduce your request rate."),
    "500": (500, "InternalError", "We encountered an internal error. Please try again."),
    "429": (429, "TooManyRequests", "Too many requests."),
    "403": (403, "AccessDenied", "Access Denied"),
    "invalid_key": (403, "InvalidAccessKeyId",
                    "The AWS Access Key Id you provided does not exist in our records."),
    "signature": (403, "SignatureDoesNotMatch",
                  "The request signature we calculated does not match the signature you provided. "
                  "Check your key and signing method."),
}


class _Dropped(Exception):
    """The handler reset the connection on purpose."""


@dataclass(frozen=True)
class Entry:
    method: str
    path: str
    outcome: str
    number: int = 0


@dataclass
class Rule:
    """Answer the first ``times`` requests that ``match(method, path, body)`` picks with ``mode``."""

    match: Callable[[str, str, bytes], bool]
    mode: str
    times: int = 1
    hits: int = 0


def _error_body(code: str, message: str, extra: dict[str, str]) -> bytes:
    fields = "".join(f"<{k}>{escape(v)}</{k}>" for k, v in extra.items())
    return (f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code><Message>{escape(message)}'
            f"</Message>{fields}<RequestId>FAULTPROXY0001</RequestId><HostId>fault-proxy</HostId></Error>"
            ).encode()


class FaultProxy:
    """A loopback proxy that forwards to ``upstream`` and injects faults (see the module docstring)."""

    def __init__(self, upstream: str, *, fault_rate: float = 0.0, seed: int = 0,
                 weights: dict[str, int] | None = None, slow_seconds: float = 1.0,
                 always: str | None = None, writes_only: bool = False, flavor: str = "s3",
                 schedule: dict[int, str] | None = None, rules: list[Rule] | None = None,
                 strip_conditions: bool = False, no_upload_listing: bool = False,
                 rewrite: Callable[[str, str, list[tuple[str, str]]], list[tuple[str, str]]] | None = None) -> None:
        parsed = urlparse(upstream)
        self.upstream = (parsed.hostname or "127.0.0.1", parsed.port or 80)
        self.upstream_url = f"http://{self.upstream[0]}:{self.upstream[1]}"
        self.flavor = flavor
        self.schedule = dict(schedule or {})
        self.rules = list(rules or [])
        self.strip_conditions = strip_conditions
        self.no_upload_listing = no_upload_listing
        #: The process ``kill_before`` / ``kill_after`` SIGKILL (set once it is started).
        self.victim: int | None = None
        self.killed = 0
        self.enabled = True  # False: forward everything (e.g. while a test sets a root up)
        self._count = 0
        self.fault_rate = fault_rate
        self.seed = seed
        self.weights = dict(weights or DEFAULT_WEIGHTS)
        self.slow_seconds = slow_seconds
        self.always = always
        self.writes_only = writes_only
        self.rewrite = rewrite
        self.log: list[Entry] = []
        self._random = random.Random(seed)
        self._lock = threading.Lock()
        self._busy = 0
        self._idle = threading.Condition(self._lock)
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
        self._httpd.daemon_threads = True
        host, port = self._httpd.server_address[:2]
        self.endpoint_url = f"http://{host}:{port}"
        self._thread = threading.Thread(target=self._httpd.serve_forever, args=(0.05,), daemon=True,
                                        name="fault-proxy")

    # -- lifecycle ---------------------------------------------------------------------------
    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.drain()
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join()

    def drain(self, timeout: float = 30.0) -> None:
        """Wait until no request is being handled (late ``slow`` requests have reached the upstream)."""
        deadline = time.monotonic() + timeout
        with self._idle:
            while self._busy:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"fault proxy still busy with {self._busy} requests")
                self._idle.wait(left)

    # -- accounting --------------------------------------------------------------------------
    @property
    def outcomes(self) -> Counter[str]:
        with self._lock:
            return Counter(e.outcome for e in self.log)

    @property
    def faults(self) -> int:
        return sum(n for outcome, n in self.outcomes.items() if outcome != "forwarded")

    def _choose(self, method: str, path: str) -> tuple[int, str]:
        with self._lock:
            self._count += 1
            number = self._count
            if not self.enabled:
                return number, "forwarded"
            if self.no_upload_listing and method == "GET" and _is_upload_listing(path):
                return number, "not_implemented"
            if self.always is not None and (not self.writes_only or method in ("PUT", "POST", "DELETE")):
                return number, self.always
            if number in self.schedule:
                return number, self.schedule[number]
            if self.fault_rate and self._random.random() < self.fault_rate:
                modes = list(self.weights)
                return number, self._random.choices(modes, [self.weights[m] for m in modes])[0]
            return number, "forwarded"

    def _match_rules(self, method: str, path: str, body: bytes) -> str:
        with self._lock:
            for rule in self.rules:
                if rule.hits < rule.times and rule.match(method, path, body):
                    rule.hits += 1
                    return rule.mode
        return "forwarded"

    def _record(self, method: str, path: str, outcome: str, number: int = 0) -> None:
        with self._lock:
            self.log.append(Entry(method, path, outcome, number))

    @property
    def requests(self) -> int:
        """Requests received so far (faulted or not)."""
        with self._lock:
            return self._count

    def reset_counts(self) -> None:
        """Start counting requests (for ``schedule``) and logging afresh."""
        with self._lock:
            self._count = 0
            self.log.clear()

    def _kill_victim(self) -> None:
        deadline = time.monotonic() + 10
        while self.victim is None and time.monotonic() < deadline:
            time.sleep(0.005)  # the test sets it right after starting the process
        victim = self.victim
        if victim is None:
            raise AssertionError("kill_before/kill_after scheduled, but FaultProxy.victim is not set")
        try:
            os.kill(victim, signal.SIGKILL)
        except ProcessLookupError:
            pass
        with self._lock:
            self.killed += 1

    def _upstream_path(self, path: str) -> str:
        if not self.strip_conditions:
            return path
        parts = urlsplit(path)
        query = parse_qsl(parts.query, keep_blank_values=True)
        kept = [(k, v) for k, v in query if k not in _CONDITION_PARAMS]
        return path if len(kept) == len(query) else urlunsplit(("", "", parts.path, urlencode(kept), ""))

    # -- the handler -------------------------------------------------------------------------
    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def handle(self) -> None:
                try:
                    super().handle()
                except (_Dropped, ConnectionError, OSError):
                    pass

            def _body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    parts = []
                    while True:
                        size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                        if size == 0:
                            while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                                pass  # trailers
                            return b"".join(parts)
                        parts.append(self.rfile.read(size))
                        self.rfile.readline()
                length = int(self.headers.get("Content-Length") or 0)
                return self.rfile.read(length) if length else b""

            def _reset(self) -> None:
                self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                self.connection.close()
                self.close_connection = True
                raise _Dropped()

            def _forward(self, body: bytes) -> tuple[int, list[tuple[str, str]], bytes]:
                connection = http.client.HTTPConnection(*proxy.upstream, timeout=60)
                try:
                    headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP_BY_HOP
                               and not (proxy.strip_conditions and k.lower() in _CONDITION_HEADERS)}
                    if body or self.command in ("PUT", "POST"):
                        headers["Content-Length"] = str(len(body))
                    connection.request(self.command, proxy._upstream_path(self.path), body=body, headers=headers)
                    response = connection.getresponse()
                    data = response.read()
                    answer = response.getheaders()
                    if proxy.rewrite is not None:
                        answer = proxy.rewrite(self.command, self.path, answer)
                    return response.status, answer, data
                finally:
                    connection.close()

            def _send(self, status: int, headers: list[tuple[str, str]], body: bytes, *,
                      cut: str | None = None) -> None:
                """Relay an answer; ``cut`` = "reset" or "close" sends only half the body first."""
                self.send_response(status)
                length = None
                for name, value in headers:
                    if name.lower() == "content-length":
                        length = value
                    elif name.lower() == "location":
                        self.send_header(name, value.replace(proxy.upstream_url, proxy.endpoint_url))
                    elif name.lower() not in _HOP_BY_HOP:
                        self.send_header(name, value)
                if self.command == "HEAD":
                    self.send_header("Content-Length", length if length is not None else "0")
                    self.end_headers()
                    if cut:
                        self._reset()
                    return
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if cut is None:
                    self.wfile.write(body)
                    return
                self.wfile.write(body[: len(body) // 2])
                self.wfile.flush()
                if cut == "reset":
                    self._reset()
                self.close_connection = True
                self.connection.shutdown(socket.SHUT_WR)
                raise _Dropped()

            def _error(self, mode: str) -> None:
                if proxy.flavor == "gcs" and mode in _GCS_REASONS:
                    self._gcs_error(mode)
                    return
                if mode == "not_implemented":
                    body = _error_body("NotImplemented", "A header you provided implies functionality "
                                       "that is not implemented.", {})
                    self._send(501, [("Content-Type", "application/xml")], body)
                    return
                status, code, message = _ERRORS[mode]
                extra: dict[str, str] = {}
                auth = self.headers.get("Authorization", "")
                if mode in ("invalid_key", "signature"):  # S3 echoes these back; so do we
                    key = re.search(r"Credential=([^/,\s]+)", auth)
                    extra["AWSAccessKeyId"] = key.group(1) if key else ""
                if mode == "signature":
                    signature = re.search(r"Signature=([0-9a-f]+)", auth)
                    extra["SignatureProvided"] = signature.group(1) if signature else ""
                    extra["StringToSign"] = "AWS4-HMAC-SHA256\n" + self.headers.get("X-Amz-Date", "")
                body = b"" if self.command == "HEAD" else _error_body(code, message, extra)
                headers = [("Content-Type", "application/xml")]
                if mode in _RETRY_AFTER:
                    headers.append(("Retry-After", "1"))
                self._send(status, headers, body)

            def _gcs_error(self, mode: str) -> None:
                status, _, message = _ERRORS[mode]
                error = {"code": status, "message": message,
                         "errors": [{"message": message, "domain": "global", "reason": _GCS_REASONS[mode]}]}
                body = b"" if self.command == "HEAD" else json.dumps({"error": error}).encode()
                headers = [("Content-Type", "application/json; charset=UTF-8")]
                if mode in _RETRY_AFTER:
                    headers.append(("Retry-After", "1"))
                self._send(status, headers, body)

            def _read_half_then_reset(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                if length:
                    self.rfile.read(max(1, length // 2))
                self._reset()

            def _answer(self) -> None:
                with proxy._lock:
                    proxy._busy += 1
                try:
                    number, outcome = proxy._choose(self.command, self.path)
                    if outcome == "reset_body":
                        proxy._record(self.command, self.path, outcome, number)
                        self._read_half_then_reset()
                    body = self._body()
                    if outcome == "forwarded" and proxy.rules and proxy.enabled:
                        outcome = proxy._match_rules(self.command, self.path, body)
                    proxy._record(self.command, self.path, outcome, number)
                    if outcome == "forwarded":
                        self._send(*self._forward(body))
                    elif outcome in _ERRORS or outcome == "not_implemented":
                        self._error(outcome)
                    elif outcome == "reset":
                        self._reset()
                    elif outcome == "reset_after":
                        self._forward(body)
                        self._reset()
                    elif outcome == "reset_mid_response":
                        self._send(*self._forward(body), cut="reset")
                    elif outcome == "truncate":
                        self._send(*self._forward(body), cut="close")
                    elif outcome == "kill_before":
                        proxy._kill_victim()
                        self._reset()
                    elif outcome == "kill_after":
                        self._forward(body)
                        proxy._kill_victim()
                        self._reset()
                    elif outcome == "slow":
                        time.sleep(proxy.slow_seconds)  # the client has given up by now
                        self._forward(body)
                        self._reset()
                    else:  # pragma: no cover - a typo in a test
                        raise AssertionError(f"unknown fault proxy outcome {outcome!r}")
                finally:
                    with proxy._idle:
                        proxy._busy -= 1
                        proxy._idle.notify_all()

            do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = do_PATCH = _answer

            def log_message(self, format: str, *args: object) -> None:
                pass

        return Handler


def _is_upload_listing(path: str) -> bool:
    """Whether a GET is S3 ListMultipartUploads (``?uploads`` on the bucket)."""
    return "uploads" in dict(parse_qsl(urlsplit(path).query, keep_blank_values=True))


def s3_client(endpoint_url: str, *, read_timeout: float = 60.0, connect_timeout: float = 5.0):
    """A boto3 S3 client like S3Storage's own (no botocore retries), with a chosen read timeout.

    S3Storage has no read-timeout option (READ_TIMEOUT_S is a constant of storage/s3_client.py); a client built
    here and passed as ``S3Storage(..., client=...)`` is how a shorter one is used.
    """
    import boto3
    from botocore.config import Config

    config = Config(retries={"mode": "standard", "total_max_attempts": 1}, read_timeout=read_timeout,
                    connect_timeout=connect_timeout, max_pool_connections=16)
    return boto3.session.Session().client("s3", endpoint_url=endpoint_url, region_name="us-east-1",
                                          config=config)
