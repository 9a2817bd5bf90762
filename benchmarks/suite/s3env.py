"""moto's S3 server and the latency proxy, each in its own process, so neither shares the client's GIL.

``honest_ranges=True`` patches moto, in the server process only, to read just
the requested bytes of a ranged GET (stock moto reads the whole object and
slices it, which costs peers that read ranges of one big object tens of
server CPU-seconds per GiB; real S3 does not) and to keep connections open
between requests (moto's own server closes every one; real S3 keeps them).
Either way moto also sends
CompleteMultipartUpload's ETag as a response header, as S3 does, which the
AWS CRT client (s3torchconnector) requires.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import re
import sys
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "testing-access-key",
    "AWS_SECRET_ACCESS_KEY": "testing-secret-key",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_REGION": "us-east-1",
}
_RANGE = re.compile(r"^bytes=(\d+)-(\d+)$")


def _patch_ranged_reads() -> None:
    """Serve ``Range: bytes=a-b`` by reading only those bytes of the stored object."""
    from moto.s3.responses import S3Response

    stock_get_object = S3Response.get_object

    def get_object(self):  # type: ignore[no-untyped-def]
        match = _RANGE.match(self.headers.get("range", "") or "")
        if not match or self.querystring.get("partNumber"):
            return stock_get_object(self)
        key, not_modified = self._get_key()
        begin, end = int(match.group(1)), int(match.group(2))
        if not_modified or begin >= key.size or begin > end or key.version_id != "null":
            return stock_get_object(self)  # stock moto answers every unusual case
        end = min(end, key.size - 1)
        with key.lock:
            key._value_buffer.seek(begin)
            content = key._value_buffer.read(end - begin + 1)
        headers = self._get_cors_headers_other()
        headers.update(key.response_dict)
        headers.update(key.metadata)
        headers.update({"Accept-Ranges": "bytes", "content-range": f"bytes {begin}-{end}/{key.size}",
                        "content-length": str(len(content))})
        return 206, headers, content

    S3Response.get_object = get_object


def _patch_complete_etag_header() -> None:
    """Send CompleteMultipartUpload's ETag as a header too, as real S3 does (the AWS CRT client needs it)."""
    from moto.s3.responses import S3Response

    stock_post = S3Response._key_response_post
    etag = re.compile(r"<ETag>(.*?)</ETag>")

    def key_response_post(self, request, body, bucket_name, query, key_name):  # type: ignore[no-untyped-def]
        status, headers, content = stock_post(self, request, body, bucket_name, query, key_name)
        text = content.decode("utf-8", "replace") if isinstance(content, bytes) else str(content)
        found = etag.search(text) if query.get("uploadId") and status == 200 else None
        if found:
            headers["ETag"] = found.group(1).replace("&quot;", '"').replace("&#34;", '"')
        return status, headers, content

    S3Response._key_response_post = key_response_post


def _serve_moto(conn, honest_ranges: bool) -> None:
    os.environ.update(AWS_ENV)
    sys.path[:0] = [str(ROOT / "tests")]
    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    _patch_complete_etag_header()
    if honest_ranges:
        _patch_ranged_reads()
    if honest_ranges:
        _serve_keep_alive(conn)
        return
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    conn.send((host, port))
    conn.recv()
    server.stop()


def _serve_keep_alive(conn) -> None:
    """moto's app on waitress, which keeps connections open between requests as S3 does.

    moto's own server (werkzeug's development server) answers every request with
    ``Connection: close``, so each request through the latency proxy would pay a new TCP
    connection and an extra round trip that real S3 does not charge; clients that send
    many small requests lose the most.
    """
    import socket
    import threading

    from moto.server import DomainDispatcherApplication, create_backend_app
    from waitress.server import create_server

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    app = DomainDispatcherApplication(create_backend_app)
    server = create_server(app, sockets=[sock], threads=48, connection_limit=1000, channel_timeout=300,
                           asyncore_use_poll=True)
    threading.Thread(target=server.run, daemon=True).start()
    conn.send(sock.getsockname()[:2])
    conn.recv()
    server.close()


def _serve_proxy(conn, upstream: tuple[str, int], one_way_delay: float, bandwidth: float) -> None:
    sys.path[:0] = [str(ROOT / "benchmarks")]
    from latency_proxy import LatencyProxy

    proxy = LatencyProxy(upstream, one_way_delay=one_way_delay, bandwidth=bandwidth).start()
    conn.send(proxy.port)
    conn.recv()
    proxy.stop()
    os._exit(0)  # connections still open at shutdown need no orderly teardown


class _Child:
    def __init__(self, target, *args) -> None:
        self._conn, child = multiprocessing.Pipe()
        self.process = multiprocessing.get_context("spawn").Process(target=target, args=(child, *args), daemon=True)
        self.process.start()
        while not self._conn.poll(0.5):  # a child that dies while starting must not hang the run
            if not self.process.is_alive():
                raise RuntimeError(f"{target.__name__} exited with status {self.process.exitcode} while starting")
        self.reply = self._conn.recv()

    @property
    def pid(self) -> int:
        return self.process.pid

    def stop(self) -> None:
        self._conn.send("stop")
        self.process.join(timeout=30)


class S3Env:
    """moto (own process) behind the latency proxy (own process); ``url`` is what clients use."""

    def __init__(self, *, honest_ranges: bool = True, one_way_delay: float = 0.010,
                 link_mbps: float = 25.0) -> None:
        for name, value in AWS_ENV.items():
            os.environ.setdefault(name, value)
        os.environ.pop("AWS_PROFILE", None)
        self.honest_ranges = honest_ranges
        self.link_mbps = link_mbps
        self._moto = _Child(_serve_moto, honest_ranges)
        host, port = self._moto.reply
        self.moto_url = f"http://{host}:{port}"
        try:
            self._proxy = _Child(_serve_proxy, (host, port), one_way_delay, link_mbps * 1e6)
        except BaseException:
            self._moto.stop()
            raise
        self.url = f"http://127.0.0.1:{self._proxy.reply}"

    @property
    def server_pid(self) -> int:
        return self._moto.pid

    @property
    def proxy_pid(self) -> int:
        return self._proxy.pid

    def client(self, connections: int = 64, *, checksums: bool = True):
        """A boto3 client through the proxy (``checksums=False``: botocore adds none it need not)."""
        import boto3
        from botocore.config import Config

        extra = {} if checksums else {"request_checksum_calculation": "when_required",
                                      "response_checksum_validation": "when_required"}
        return boto3.client("s3", endpoint_url=self.url, region_name="us-east-1",
                            config=Config(max_pool_connections=connections, **extra))

    def new_bucket(self) -> str:
        name = f"bench-{uuid.uuid4().hex[:16]}"
        self.client(2).create_bucket(Bucket=name)
        return name

    def stop(self) -> None:
        self._proxy.stop()
        self._moto.stop()

    def __enter__(self) -> "S3Env":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
