"""Translation of google-cloud-storage, google-auth and requests errors into cloudckpt's error tree.

Every error names the operation, the bucket and the object; a 403 is PermissionDenied, never
NotFound; only what may succeed if tried again is a TransientError.  Messages never quote
request URLs: resumable upload session URLs are bearer capabilities.
"""

from __future__ import annotations

import re
import socket

import google.auth.exceptions
import requests
import urllib3
from google.api_core import exceptions as api_exceptions

try:
    from google.cloud.storage.exceptions import DataCorruption, InvalidResponse
except ImportError:  # google-cloud-storage < 3 raised google-resumable-media's classes
    from google.resumable_media import DataCorruption, InvalidResponse

from ..errors import (
    AlreadyExists,
    CloudCkptError,
    EndpointUnreachable,
    NotFound,
    PermissionDenied,
    PreconditionFailed,
    TransientError,
)
from .base import IfMatch, PutMode
from .endpoints import unreachable_message

_TRANSIENT_STATUSES = frozenset({408, 429, 500, 502, 503, 504})
_NETWORK_ERRORS = (
    requests.exceptions.ConnectionError,
    requests.exceptions.Timeout,
    requests.exceptions.ChunkedEncodingError,
    google.auth.exceptions.TransportError,
    ConnectionError,
    TimeoutError,
)
SDK_ERRORS = (
    api_exceptions.GoogleAPICallError,
    InvalidResponse,
    DataCorruption,
    google.auth.exceptions.GoogleAuthError,
    *_NETWORK_ERRORS,
)
_CREDENTIALS_HINT = (
    "check the credentials in use: Application Default Credentials "
    "(`gcloud auth application-default login`, GOOGLE_APPLICATION_CREDENTIALS, or the VM / "
    "workload identity service account), and that its IAM roles on the bucket allow this "
    "(e.g. roles/storage.objectAdmin)"
)
_URL = re.compile(r"https?://\S+")
_NO_BUCKET = re.compile(r"bucket does not exist", re.IGNORECASE)


def translate_error(exc: BaseException, op: str, bucket: str, name: str | None = None,
                    mode: PutMode | None = None, *, missing_bucket: bool = False,
                    endpoint: tuple[str | None, str | None] | None = None) -> CloudCkptError:
    """Map a google-cloud-storage / google-auth / requests exception to the cloudckpt error tree.

    ``op`` names the operation, ``name`` the full object name (store prefix
    included), ``mode`` the write mode of a conditional write (it decides
    whether HTTP 412 means AlreadyExists or PreconditionFailed), and
    ``missing_bucket`` whether a 404 can only mean a missing bucket (a write
    or a listing cannot miss an object).  A CRC32C mismatch in a transfer
    (DataCorruption) is a TransientError: the stored bytes were checked by GCS
    on upload, so a re-read usually succeeds.  Messages never quote request
    URLs (resumable session URLs are bearer capabilities).
    """
    what = f"{op} gs://{bucket}/{name or ''}"
    if _refused(exc):
        url, setting = endpoint or (None, None)
        return EndpointUnreachable(unreachable_message(what, url, setting, "connection refused or host unknown"))
    if isinstance(exc, DataCorruption):
        return TransientError(f"{what}: CRC32C mismatch in transfer; a re-read may succeed")
    status = _http_status(exc)
    if status is None:
        return _non_http_error(exc, what)
    message = _server_message(exc)
    detail = f"(HTTP {status}{message})"
    if status == 404:
        return _not_found(what, bucket, detail, missing_bucket or bool(_NO_BUCKET.search(message)))
    if status in (401, 403):
        return PermissionDenied(f"{what}: access denied {detail}; {_CREDENTIALS_HINT}")
    if status == 412:
        return refusal(what, mode, detail)
    if status in _TRANSIENT_STATUSES:
        return TransientError(f"{what} failed {detail}; GCS reports a temporary condition, retry with backoff")
    return CloudCkptError(f"{what} failed {detail}")


def _refused(exc: BaseException) -> bool:
    """Whether no connection could be made at all (refused, or the host name does not resolve)."""
    seen: list[object] = [exc]
    for _ in range(8):
        if not seen:
            return False
        current = seen.pop()
        if isinstance(current, (urllib3.exceptions.NewConnectionError, ConnectionRefusedError, socket.gaierror)):
            return True
        if isinstance(current, BaseException):
            seen.extend(a for a in current.args if isinstance(a, BaseException))
            seen.extend(x for x in (getattr(current, "reason", None), current.__cause__) if x is not None)
    return False


def _http_status(exc: BaseException) -> int | None:
    if isinstance(exc, api_exceptions.GoogleAPICallError):
        return exc.code
    if isinstance(exc, InvalidResponse):
        return getattr(exc.response, "status_code", None)
    return None


def _server_message(exc: BaseException) -> str:
    """GCS's own explanation from the error body, without URLs, or ''."""
    errors = getattr(exc, "errors", None) or []
    message = next((e.get("message") for e in errors if isinstance(e, dict) and e.get("message")), "")
    message = _URL.sub("<url>", str(message))[:300]
    return f": {message}" if message else ""


def _non_http_error(exc: BaseException, what: str) -> CloudCkptError:
    if isinstance(exc, _NETWORK_ERRORS) or getattr(exc, "retryable", False):
        return TransientError(f"{what} failed in transit ({type(exc).__name__}); it may succeed if tried again")
    if isinstance(exc, google.auth.exceptions.GoogleAuthError):
        return PermissionDenied(f"{what}: no usable credentials ({type(exc).__name__}); {_CREDENTIALS_HINT}")
    return CloudCkptError(f"{what} failed: {type(exc).__name__}")


def _not_found(what: str, bucket: str, detail: str, bucket_missing: bool) -> NotFound:
    if bucket_missing:
        return NotFound(
            f"{what}: bucket {bucket!r} does not exist {detail}; check the bucket name in the URL "
            "(and endpoint_url / STORAGE_EMULATOR_HOST when using an emulator)"
        )
    return NotFound(f"{what}: no such object {detail}")


def refusal(what: str, mode: PutMode | None, detail: str) -> CloudCkptError:
    """The error for a write that ``mode`` forbids (HTTP 412, or an early check)."""
    if mode == "create":
        return AlreadyExists(f"{what} refused: the key already exists (create-only write) {detail}")
    if isinstance(mode, IfMatch):
        return PreconditionFailed(
            f"{what} refused: the object changed since generation {mode.token!r} was read "
            f"{detail}; re-read it and retry"
        )
    return PreconditionFailed(f"{what} refused: a precondition did not hold {detail}")
