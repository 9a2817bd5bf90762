"""A loopback HTTP server that answers every request with one canned response.

Real SDKs talk real HTTP to it, so tests can see how a backend handles an
S3-style 403 or 503, a truncated body, or a per-key error, none of which the
fake servers produce on demand.

Usage::

    with StubHTTPServer(s3_error(503, "SlowDown", "Reduce your request rate.")) as server:
        ...  # point a client at server.endpoint_url; server.requests records what arrived
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Self
from xml.sax.saxutils import escape


@dataclass(frozen=True)
class CannedResponse:
    """What the stub answers.  ``send_bytes`` cuts the body short and drops the connection."""

    status: int
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)
    send_bytes: int | None = None


@dataclass(frozen=True)
class RecordedRequest:
    method: str
    path: str
    headers: dict[str, str]


def s3_error(status: int, code: str, message: str) -> CannedResponse:
    """An S3 REST error response, as S3 itself formats it."""
    body = (
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        f"<Error><Code>{escape(code)}</Code><Message>{escape(message)}</Message>"
        "<RequestId>4442587FB7D0A2F9</RequestId><HostId>stub</HostId></Error>"
    ).encode()
    return CannedResponse(status, body, {"Content-Type": "application/xml"})


class StubHTTPServer:
    """Serves one :class:`CannedResponse` on ``127.0.0.1`` (a free port) while in a ``with`` block."""

    def __init__(self, response: CannedResponse) -> None:
        self.response = response
        self.requests: list[RecordedRequest] = []
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
        self._httpd.daemon_threads = True
        host, port = self._httpd.server_address[:2]
        self.endpoint_url = f"http://{host}:{port}"
        self._thread = threading.Thread(target=self._httpd.serve_forever, args=(0.05,), daemon=True)

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join()

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        stub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _answer(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                if length:
                    self.rfile.read(length)
                stub.requests.append(RecordedRequest(self.command, self.path, dict(self.headers)))
                canned = stub.response
                self.send_response(canned.status)
                for name, value in canned.headers.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(canned.body)))
                if canned.send_bytes is not None:
                    self.send_header("Connection", "close")
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(canned.body[: canned.send_bytes])
                if canned.send_bytes is not None:
                    self.wfile.flush()
                    self.close_connection = True

            do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _answer

            def log_message(self, format: str, *args: object) -> None:
                pass

        return Handler
