"""Translating boto3/botocore failures into the cloudckpt error tree, at the S3 backend's edge.

403 is PermissionDenied (never NotFound), throttling and 5xx are TransientError (the only
retried kind), 412 is AlreadyExists for a create and PreconditionFailed for a compare-and-swap.
Messages name the operation and the ``s3://bucket/key``, and never carry credentials.
"""

from __future__ import annotations

from dataclasses import dataclass

import urllib3

from botocore.exceptions import (
    ClientError,
    ConnectionClosedError,
    ConnectTimeoutError,
    CredentialRetrievalError,
    EndpointConnectionError,
    FlexibleChecksumError,
    IncompleteReadError,
    NoCredentialsError,
    PartialCredentialsError,
    ProfileNotFound,
    ReadTimeoutError,
    ResponseStreamingError,
)

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

__all__ = ["Call", "error_for_code", "precondition_error", "translate_error"]

_NETWORK_ERRORS = (
    # botocore reads the body of a non-streaming answer (an error, a listing) itself, and lets
    # urllib3's exception through when the connection breaks in the middle of it.
    urllib3.exceptions.HTTPError,
    EndpointConnectionError,
    ConnectionClosedError,
    ReadTimeoutError,
    ConnectTimeoutError,
    ResponseStreamingError,
    IncompleteReadError,
    FlexibleChecksumError,  # a response body failed its checksum: corrupted on the wire
)
_CREDENTIAL_ERRORS = (NoCredentialsError, PartialCredentialsError, CredentialRetrievalError, ProfileNotFound)
_NOT_FOUND_CODES = frozenset({"NoSuchKey", "NotFound", "404"})
_PERMISSION_CODES = frozenset({
    "AccessDenied", "AllAccessDisabled", "InvalidAccessKeyId", "SignatureDoesNotMatch",
    "ExpiredToken", "InvalidToken", "TokenRefreshRequired", "RequestTimeTooSkewed", "403",
})
# BadDigest: the bytes S3 received fail the checksum we sent, i.e. they were damaged in transit.
_TRANSIENT_CODES = frozenset({
    "InternalError", "ServiceUnavailable", "SlowDown", "RequestTimeout", "Throttling",
    "ThrottlingException", "TooManyRequests", "RequestLimitExceeded", "BadDigest",
    "ConditionalRequestConflict", "OperationAborted", "500", "502", "503", "504",
})
_TRANSIENT_STATUSES = frozenset({429, 500, 502, 503, 504})
_CREDENTIALS_HINT = (
    "check the credentials in use (AWS_PROFILE, AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, "
    "AWS_SESSION_TOKEN, the instance or pod role): are they valid, unexpired, for the right "
    "account, and does the IAM and bucket policy allow this action?"
)


# -- error translation ---------------------------------------------------------
@dataclass(frozen=True)
class Call:
    """What was being done when an error happened: enough to write a useful message."""

    op: str
    bucket: str
    key: str | None = None
    mode: PutMode | None = None

    @property
    def target(self) -> str:
        return f"s3://{self.bucket}/{self.key}" if self.key is not None else f"s3://{self.bucket}"


def translate_error(exc: BaseException, op: str, bucket: str, key: str | None = None,
                    mode: PutMode | None = None, endpoint: tuple[str, str] | None = None) -> CloudCkptError:
    """Map a boto3/botocore exception to the cloudckpt error tree.

    ``op`` names the operation, ``key`` the full object key (with the store
    prefix), and ``mode`` the write mode of a conditional write, which decides
    whether an HTTP 412 means AlreadyExists or PreconditionFailed.  ``endpoint`` is
    (URL, the setting that chose it), named when nothing answers there.
    """
    call = Call(op, bucket, key, mode)
    if isinstance(exc, EndpointConnectionError):  # refused, or the host name does not resolve
        url, setting = endpoint or (None, None)
        return EndpointUnreachable(unreachable_message(f"{op} {call.target}", url, setting, type(exc).__name__))
    if isinstance(exc, ClientError):
        error = exc.response.get("Error", {})
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        return error_for_code(str(error.get("Code", "")), status, str(error.get("Message", "")), call)
    if isinstance(exc, _NETWORK_ERRORS):
        return TransientError(
            f"{op} {call.target} failed in transit ({type(exc).__name__}: {exc}); "
            "it may succeed if tried again"
        )
    if isinstance(exc, _CREDENTIAL_ERRORS):
        return PermissionDenied(f"{op} {call.target}: no usable AWS credentials ({exc}); {_CREDENTIALS_HINT}")
    return CloudCkptError(f"{op} {call.target} failed: {type(exc).__name__}: {exc}")


def error_for_code(code: str, status: int | None, message: str, call: Call) -> CloudCkptError:
    """The error for one S3 error code (from an exception or a DeleteObjects entry)."""
    what = f"{call.op} {call.target}"
    detail = f"({code or status}: {message})" if message else f"({code or status})"
    if status == 412 or code == "PreconditionFailed":
        return precondition_error(call, detail)
    if code == "NoSuchKey" and isinstance(call.mode, IfMatch):
        return PreconditionFailed(
            f"{what} refused: the object no longer exists, so it cannot match token "
            f"{call.mode.token!r} {detail}; re-read it and retry"
        )
    if code == "NoSuchBucket":
        return NotFound(
            f"{what}: bucket {call.bucket!r} does not exist {detail}; check the bucket name, "
            "and the region or endpoint_url the store was opened with"
        )
    if code == "NoSuchUpload":
        return NotFound(f"{what}: the multipart upload was aborted or already completed {detail}")
    if code in _NOT_FOUND_CODES or status == 404:
        return NotFound(
            f"{what}: no such object {detail}; if nothing at all is found, check that bucket "
            f"{call.bucket!r} exists at this endpoint"
        )
    if code in _PERMISSION_CODES or status in (401, 403):
        return PermissionDenied(f"{what}: access denied {detail}; {_CREDENTIALS_HINT}")
    if code in _TRANSIENT_CODES or status in _TRANSIENT_STATUSES:
        return TransientError(f"{what} failed {detail}; S3 reports a temporary condition, retry with backoff")
    return CloudCkptError(f"{what} failed {detail}")


def precondition_error(call: Call, detail: str) -> CloudCkptError:
    what = f"{call.op} {call.target}"
    if call.mode == "create":
        return AlreadyExists(f"{what} refused: the key already exists (create-only write) {detail}")
    if isinstance(call.mode, IfMatch):
        return PreconditionFailed(
            f"{what} refused: the object changed since token {call.mode.token!r} was read "
            f"{detail}; re-read it and retry"
        )
    return PreconditionFailed(f"{what} refused: a precondition did not hold {detail}")


# -- helpers -------------------------------------------------------------------
