"""Fixtures of the timeline suite: a fresh root on S3 (moto's server) and on GCS (fake-gcs-server)."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
from servers import make_store

from cloudckpt.storage import Storage


@dataclass
class Root:
    """A fresh root: the store, and how the ``cloudckpt`` command reaches the same objects."""

    store: Storage
    url: str
    cli_options: list[str]


@pytest.fixture(params=["s3", "gcs"])
def cloud_root(request, tmp_path):
    store = make_store(request.param, request, tmp_path)
    server = request.getfixturevalue("moto_s3" if request.param == "s3" else "fake_gcs")
    yield Root(store, store.url, ["--endpoint-url", server.endpoint_url])
    store.close()
