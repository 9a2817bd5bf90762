"""Which endpoint a cloud store talks to, and which setting chose it (for errors and ``doctor``).

An unreachable endpoint is almost always a configuration mistake (a stale ``--endpoint-url``,
an emulator that is not running, a wrong ``AWS_ENDPOINT_URL``); the error has to say which
setting to fix, not just that a connection failed.
"""

from __future__ import annotations

import os
from typing import Any

#: How a caller sets ``endpoint_url``: the option, or in the CLI its flag and environment variable.
_OPTION = "the endpoint_url option (in the CLI: --endpoint-url or CLOUDCKPT_ENDPOINT_URL)"


def s3_endpoint(client: Any, endpoint_url: str | None, region: str | None, own_client: bool) -> tuple[str, str]:
    """(endpoint, the setting that chose it) of an S3 client."""
    endpoint = str(getattr(getattr(client, "meta", None), "endpoint_url", None) or endpoint_url or "unknown")
    if endpoint_url:
        return endpoint, _OPTION
    if not own_client:
        return endpoint, "the boto3 client passed to S3Storage"
    for variable in ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL"):
        if os.environ.get(variable):
            return endpoint, f"the environment variable {variable}"
    where = region or getattr(getattr(client, "meta", None), "region_name", None) or "the default"
    return endpoint, f"the AWS default for region {where} (AWS_DEFAULT_REGION, AWS_PROFILE, ~/.aws/config)"


def gcs_endpoint(client: Any, endpoint_url: str | None, own_client: bool) -> tuple[str, str]:
    """(endpoint, the setting that chose it) of a google-cloud-storage client."""
    connection = getattr(client, "_connection", None)
    endpoint = str(getattr(connection, "API_BASE_URL", None) or endpoint_url or "unknown")
    if endpoint_url:
        return endpoint, _OPTION
    if not own_client:
        return endpoint, "the storage.Client passed to GCSStorage"
    if os.environ.get("STORAGE_EMULATOR_HOST"):
        return endpoint, "the environment variable STORAGE_EMULATOR_HOST"
    return endpoint, "the GCS default"


def unreachable_message(what: str, endpoint: str | None, setting: str | None, reason: str) -> str:
    """The message of an EndpointUnreachable error."""
    where = f"endpoint {endpoint}" if endpoint else "its endpoint"
    chosen = f", chosen by {setting}" if setting else ""
    return (f"{what}: cannot connect to {where}{chosen} ({reason}); check that this is the right "
            "endpoint and that the service is running and reachable from here")
