"""Fixtures of the checkpoint-promise suite: one manager test, four backends."""

from __future__ import annotations

import pytest
from ckpt_util import make_store

BACKENDS = ["memory", "local", "s3", "gcs"]


@pytest.fixture(params=BACKENDS)
def any_store(request, tmp_path):
    """A fresh, empty store on each backend: memory, a local tmp dir, S3 (moto), GCS (fake-gcs)."""
    store = make_store(request.param, request, tmp_path)
    yield store
    store.close()
