from __future__ import annotations

import pytest

from servers import FakeGCS, MotoS3


@pytest.fixture(scope="session")
def moto_s3():
    server = MotoS3()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def fake_gcs():
    server = FakeGCS()
    yield server
    server.stop()
