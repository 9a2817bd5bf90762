"""A fault-injecting HTTP proxy for S3 clients: a threaded loopback server in front of moto.

Point an S3 client's ``endpoint_url`` at :attr:`FaultProxy.endpoint_url`.  Each request is
either forwarded to the upstream server (moto) and its answer relayed, or, for a seeded share
of requests (``fault_rate``), answered with a fault:

``503``          503 SlowDown, with S3's XML error body
``500``          500 InternalError
``429``          429 TooManyRequests
``reset``        the connection is reset (RST) before the request reaches the upstream
``reset_after``  the request is applied upstream, then the connection is reset: the client
                 cannot know it succeeded (the ambiguous case retries must handle)
``slow``         the answer is held past the client's read timeout; the request reaches the
                 upstream only afterwards (late, while the client has moved on to its retry)

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
import random
import re
import socket
import struct
import threading
import time
from collections import Counter
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable, Self
from urllib.parse import urlparse
from xml.sax.saxutils import escape

FAULT_MODES = ("503", "500", "429", "reset", "reset_after", "slow")
DEFAULT_WEIGHTS = {"503": 3, "500": 2, "429": 2, "reset": 2, "reset_after": 2, "slow": 1}
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


def _error_body(code: str, message: str, extra: dict[str, str]) -> bytes:
    fields = "".join(f"<{k}>{escape(v)}</{k}>" for k, v in extra.items())
    return (f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code><Message>{escape(message)}'
            f"</Message>{fields}<RequestId>FAULTPROXY0001</RequestId><HostId>fault-proxy</HostId></Error>"
            ).encode()


class FaultProxy:
    """A loopback proxy that forwards to ``upstream`` and injects faults (see the module docstring)."""

    def __init__(self, upstream: str, *, fault_rate: float = 0.0, seed: int = 0,
                 weights: dict[str, int] | None = None, slow_seconds: float = 1.0,
                 always: str | None = None, writes_only: bool = False,
                 rewrite: Callable[[str, str, list[tuple[str, str]]], list[tuple[str, str]]] | None = None) -> None:
        parsed = urlparse(upstream)
        self.upstream = (parsed.hostname or "127.0.0.1", parsed.port or 80)
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

    def _choose(self, method: str) -> str:
        with self._lock:
            if self.always is not None and (not self.writes_only or method in ("PUT", "POST", "DELETE")):
                return self.always
            if self.fault_rate and self._random.random() < self.fault_rate:
                modes = list(self.weights)
                return self._random.choices(modes, [self.weights[m] for m in modes])[0]
            return "forwarded"

    def _record(self, method: str, path: str, outcome: str) -> None:
        with self._lock:
            self.log.append(Entry(method, path, outcome))

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
                    headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP_BY_HOP}
                    if body or self.command in ("PUT", "POST"):
                        headers["Content-Length"] = str(len(body))
                    connection.request(self.command, self.path, body=body, headers=headers)
                    response = connection.getresponse()
                    data = response.read()
                    answer = response.getheaders()
                    if proxy.rewrite is not None:
                        answer = proxy.rewrite(self.command, self.path, answer)
                    return response.status, answer, data
                finally:
                    connection.close()

            def _send(self, status: int, headers: list[tuple[str, str]], body: bytes) -> None:
                self.send_response(status)
                length = None
                for name, value in headers:
                    if name.lower() == "content-length":
                        length = value
                    elif name.lower() not in _HOP_BY_HOP:
                        self.send_header(name, value)
                if self.command == "HEAD":
                    self.send_header("Content-Length", length if length is not None else "0")
                    self.end_headers()
                    return
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def _error(self, mode: str) -> None:
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
                self._send(status, [("Content-Type", "application/xml")], body)

            def _answer(self) -> None:
                with proxy._lock:
                    proxy._busy += 1
                try:
                    body = self._body()
                    outcome = proxy._choose(self.command)
                    proxy._record(self.command, self.path, outcome)
                    if outcome == "forwarded":
                        self._send(*self._forward(body))
                    elif outcome in _ERRORS:
                        self._error(outcome)
                    elif outcome == "reset":
                        self._reset()
                    elif outcome == "reset_after":
                        self._forward(body)
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

            do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _answer

            def log_message(self, format: str, *args: object) -> None:
                pass

        return Handler


def s3_client(endpoint_url: str, *, read_timeout: float = 60.0, connect_timeout: float = 5.0):
    """A boto3 S3 client like S3Storage's own (no botocore retries), with a chosen read timeout.

    S3Storage has no read-timeout option (READ_TIMEOUT_S is a module constant); a client built
    here and passed as ``S3Storage(..., client=...)`` is how a shorter one is used.
    """
    import boto3
    from botocore.config import Config

    config = Config(retries={"mode": "standard", "total_max_attempts": 1}, read_timeout=read_timeout,
                    connect_timeout=connect_timeout, max_pool_connections=16)
    return boto3.session.Session().client("s3", endpoint_url=endpoint_url, region_name="us-east-1",
                                          config=config)
