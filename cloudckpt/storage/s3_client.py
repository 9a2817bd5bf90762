"""The boto3 client every :class:`~cloudckpt.storage.s3.S3Storage` builds for itself.

Each store gets its own session (credentials are resolved afresh for each), but the clients share
one parsed copy of botocore's S3 service model and endpoint rules: parsing them again for every
new client cost about 0.1 CPU-second each time.
"""

from __future__ import annotations

import threading
from typing import Any

import boto3
import botocore.loaders
from botocore.config import Config

CONNECT_TIMEOUT_S = 10
READ_TIMEOUT_S = 60

_models_lock = threading.Lock()
_shared_models: Any = None


def _service_models() -> Any:
    """The process's one botocore data loader (it caches what it parses)."""
    global _shared_models
    with _models_lock:
        if _shared_models is None:
            _shared_models = botocore.loaders.create_loader()
        return _shared_models


def make_client(endpoint_url: str | None, region: str | None, profile: str | None,
                max_pool_connections: int) -> Any:
    """A client with cloudckpt's settings: one attempt per call (cloudckpt retries), bounded
    timeouts, no checksum or payload hash of botocore's own."""
    session = boto3.session.Session(profile_name=profile)
    session._session.register_component("data_loader", _service_models())
    config = Config(
        retries={"mode": "standard", "total_max_attempts": 1},
        connect_timeout=CONNECT_TIMEOUT_S,
        read_timeout=READ_TIMEOUT_S,
        max_pool_connections=max_pool_connections,
        # Every body carries the CRC32C cloudckpt computed, which S3 checks before storing it:
        # botocore need not add a checksum of its own, nor SHA-256 the payload for the signature
        # (it already skips that over HTTPS; this skips it over plain HTTP endpoints too).
        request_checksum_calculation="when_required",
        s3={"payload_signing_enabled": False},
    )
    return session.client("s3", endpoint_url=endpoint_url, region_name=region, config=config)
