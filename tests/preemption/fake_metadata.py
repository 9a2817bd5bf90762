"""A local fake of the EC2 (IMDSv2) and GCE metadata servers' preemption endpoints.

EC2 (IMDSv2)
    ``PUT /latest/api/token`` needs ``X-aws-ec2-metadata-token-ttl-seconds`` (1..21600; else 400)
    and refuses requests carrying ``X-Forwarded-For`` (403), like the real service.
    ``GET /latest/meta-data/spot/instance-action`` needs a valid, unexpired
    ``X-aws-ec2-metadata-token`` (else 401); 404 until a notice is switched on, then 200 with
    ``{"action": "terminate", "time": "..."}``.
GCE
    ``GET /computeMetadata/v1/instance/preempted`` needs ``Metadata-Flavor: Google`` (else 403);
    the body is ``FALSE``, or ``TRUE`` once preempted.
Test control
    ``GET /_test/ready?step=N`` (called by a worker that reached the step where it waits for a
    notice) sets :attr:`FakeMetadataServer.ready`.
"""

from __future__ import annotations

import datetime as _dt
import json
import secrets
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse

EC2_TOKEN = "/latest/api/token"
EC2_ACTION = "/latest/meta-data/spot/instance-action"
GCE_PREEMPTED = "/computeMetadata/v1/instance/preempted"
READY = "/_test/ready"


class FakeMetadataServer:
    """Serves on 127.0.0.1 (a free port) from a daemon thread; ``url`` is the endpoint to configure."""

    def __init__(self) -> None:
        self.ec2_action: dict[str, str] | None = None
        self.gce_preempted = False
        self.failures = 0  # answer that many metadata GETs with 500
        self.tokens: dict[str, float] = {}  # token -> monotonic expiry
        self.log: list[tuple[str, str, int]] = []  # (method, path, status)
        self.ready = threading.Event()
        self.ready_steps: list[int] = []
        self._changed = threading.Condition()
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: object) -> None:  # quiet
                pass

            def _send(self, status: int, body: bytes = b"", content_type: str = "text/plain",
                      headers: dict[str, str] | None = None) -> None:
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                for name, value in (headers or {}).items():
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(body)
                server._record(self.command, urlparse(self.path).path, status)

            def do_PUT(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                if length:
                    self.rfile.read(length)
                if urlparse(self.path).path != EC2_TOKEN:
                    return self._send(404)
                if self.headers.get("X-Forwarded-For") is not None:
                    return self._send(403)
                ttl = self.headers.get("X-aws-ec2-metadata-token-ttl-seconds")
                if ttl is None or not ttl.isdigit() or not 1 <= int(ttl) <= 21600:
                    return self._send(400)
                token = secrets.token_urlsafe(24)
                with server._changed:
                    server.tokens[token] = time.monotonic() + int(ttl)
                self._send(200, token.encode(), headers={"X-aws-ec2-metadata-token-ttl-seconds": ttl})

            def do_GET(self) -> None:
                url = urlparse(self.path)
                if url.path == READY:
                    server.ready_steps.append(int(parse_qs(url.query).get("step", ["-1"])[0]))
                    server.ready.set()
                    return self._send(200, b"ok")
                if url.path == EC2_ACTION:
                    token = self.headers.get("X-aws-ec2-metadata-token")
                    with server._changed:
                        valid = token is not None and server.tokens.get(token, 0.0) > time.monotonic()
                    if not valid:
                        return self._send(401)
                    if server._take_failure():
                        return self._send(500)
                    if server.ec2_action is None:
                        return self._send(404, b"Not Found")
                    return self._send(200, json.dumps(server.ec2_action).encode(), "application/json")
                if url.path == GCE_PREEMPTED:
                    if self.headers.get("Metadata-Flavor") != "Google" or self.headers.get("X-Forwarded-For"):
                        return self._send(403)
                    if server._take_failure():
                        return self._send(500)
                    body = b"TRUE" if server.gce_preempted else b"FALSE"
                    return self._send(200, body, headers={"Metadata-Flavor": "Google"})
                self._send(404)

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        host, port = self._httpd.server_address[:2]
        self.url = f"http://{host}:{port}"
        self._thread = threading.Thread(target=self._httpd.serve_forever, args=(0.05,), name="fake-metadata", daemon=True)
        self._thread.start()

    # -- what tests switch --------------------------------------------------------------------
    def interrupt_ec2(self, action: str = "terminate") -> None:
        when = _dt.datetime.now(_dt.timezone.utc) + _dt.timedelta(minutes=2)
        self.ec2_action = {"action": action, "time": when.strftime("%Y-%m-%dT%H:%M:%SZ")}

    def preempt_gce(self) -> None:
        self.gce_preempted = True

    def reset(self) -> None:
        """No notice any more (a fresh machine), no pending failures, readiness cleared."""
        self.ec2_action = None
        self.gce_preempted = False
        self.failures = 0
        self.ready.clear()

    def revoke_tokens(self) -> None:
        with self._changed:
            self.tokens.clear()

    def fail_next(self, count: int) -> None:
        with self._changed:
            self.failures = count

    # -- what tests observe -------------------------------------------------------------------
    def count(self, path: str, status: int | None = None, method: str = "GET") -> int:
        with self._changed:
            return sum(1 for m, p, s in self.log if m == method and p == path and (status is None or s == status))

    def wait_for(self, path: str, count: int, *, status: int | None = None, method: str = "GET",
                 timeout: float = 10.0) -> bool:
        """Block until ``count`` such requests were answered (True), or ``timeout`` passed (False)."""
        with self._changed:
            return self._changed.wait_for(
                lambda: sum(1 for m, p, s in self.log if m == method and p == path
                            and (status is None or s == status)) >= count, timeout)

    def _record(self, method: str, path: str, status: int) -> None:
        with self._changed:
            self.log.append((method, path, status))
            self._changed.notify_all()

    def _take_failure(self) -> bool:
        with self._changed:
            if self.failures > 0:
                self.failures -= 1
                return True
            return False

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(10)
