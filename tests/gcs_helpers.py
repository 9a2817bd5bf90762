"""Test helpers for the GCS backend: keep fake-gcs-server responsive, and a GCS that only fails."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import IO

import pytest


def drain_server_log(fake_gcs) -> None:
    """Read and discard fake-gcs-server's stderr so that the server never blocks on it.

    ``FakeGCSServer`` starts the binary with ``stderr=PIPE`` and never reads
    it; the server logs one line per request, so after a few hundred requests
    the 64 KiB pipe is full and every request hangs.  Idempotent.
    """
    process = getattr(fake_gcs._server, "_process", None)
    stream = getattr(process, "stderr", None)
    if stream is None or getattr(fake_gcs, "_log_drained", False):
        return
    fake_gcs._log_drained = True
    threading.Thread(target=_discard, args=(stream,), name="fake-gcs-log", daemon=True).start()


def _discard(stream: IO[bytes]) -> None:
    while stream.read(65536):
        pass


class GCSErrorServer:
    """A loopback HTTP server that answers every request with one GCS-style JSON error.

    Point a store at ``endpoint_url`` to drive the real SDK over real HTTP
    into an error fake-gcs-server cannot produce (403, 429, 503, ...).
    ``requests`` records ``(method, path)`` of everything received.
    """

    def __init__(self, status: int, reason: str, message: str) -> None:
        body = json.dumps({"error": {
            "code": status,
            "message": message,
            "errors": [{"domain": "global", "reason": reason, "message": message}],
        }}).encode()
        self.requests: list[tuple[str, str]] = []
        handler = _handler(status, body, self.requests)
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.05,), daemon=True)
        self._thread.start()
        host, port = self._server.server_address[:2]
        self.endpoint_url = f"http://{host}:{port}"

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()

    def __enter__(self) -> "GCSErrorServer":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def _handler(status: int, body: bytes, seen: list[tuple[str, str]]) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def _answer(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            if length:
                self.rfile.read(length)
            seen.append((self.command, self.path))
            self.send_response(status)
            self.send_header("Content-Type", "application/json; charset=UTF-8")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _answer

        def log_message(self, format: str, *args) -> None:
            pass

    return Handler


@pytest.hookimpl(hookwrapper=True)
def pytest_fixture_setup(fixturedef, request):
    """As a plugin (``-p gcs_helpers``): drain the log of every ``fake_gcs`` server as it starts."""
    outcome = yield
    if fixturedef.argname == "fake_gcs" and outcome.excinfo is None:
        drain_server_log(outcome.get_result())
