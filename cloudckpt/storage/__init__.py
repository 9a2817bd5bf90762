"""Storage backends behind one protocol, chosen by URL.

>>> store = open_storage("memory://")
>>> store.put("k", b"data", mode="create").size
4
>>> store.get("k", range=(0, 2))
b'da'
"""

from __future__ import annotations

import os
from typing import Any
from urllib.parse import urlparse

from .base import (
    Buffer,
    IfMatch,
    MultipartUpload,
    ObjectInfo,
    PendingUpload,
    PutMode,
    Storage,
    check_key,
    upload_multipart,
)
from .capabilities import check_option
from .memory import MemoryStorage
from .retry import RetryPolicy, RetryingStorage

__all__ = [
    "Buffer", "IfMatch", "MemoryStorage", "MultipartUpload", "ObjectInfo", "PendingUpload",
    "PutMode", "RetryPolicy", "RetryingStorage", "Storage", "check_key", "open_storage",
    "upload_multipart",
]

_INSTALL_HINTS = {
    "s3": "S3 support needs boto3: pip install 'boto3>=1.35'",
    "gs": "GCS support needs google-cloud-storage: pip install 'google-cloud-storage>=2.18'",
}


def _split_bucket_url(url: str) -> tuple[str, str]:
    parsed = urlparse(url)
    if not parsed.netloc:
        raise ValueError(f"{url!r} names no bucket; expected {parsed.scheme}://BUCKET[/PREFIX]")
    return parsed.netloc, parsed.path.strip("/")


def open_storage(url: str | os.PathLike[str], *, retry: RetryPolicy | None = None, **options: Any) -> Storage:
    """Open the store a URL names.

    ``s3://bucket/prefix``, ``gs://bucket/prefix``, ``file:///path``, a plain
    path, or ``memory://`` (a fresh, empty in-process store).  ``options`` go to
    the backend (e.g. ``endpoint_url``, ``region``, ``profile`` for S3;
    ``project``, ``endpoint_url`` for GCS).  Transient failures are retried by
    ``retry`` (a default :class:`RetryPolicy` unless given; pass
    ``RetryPolicy(max_attempts=1)`` to disable).  ``conditional_writes="unsupported"``
    accepts a store that ignores conditional writes, in single-writer mode (see
    :mod:`cloudckpt.storage.capabilities`).
    """
    url = os.fspath(url)
    conditional_writes = options.pop("conditional_writes", "required")
    scheme = urlparse(url).scheme if "://" in url else ""
    if scheme == "memory":
        if options:
            raise TypeError(f"memory:// takes no options, got {sorted(options)}")
        backend: Storage = MemoryStorage(url)
    elif scheme in ("", "file"):
        from .local import LocalStorage

        backend = LocalStorage(url, **options)
    elif scheme == "s3":
        bucket, prefix = _split_bucket_url(url)
        backend = _import_backend("s3", "S3Storage")(bucket, prefix, **options)
    elif scheme in ("gs", "gcs"):
        bucket, prefix = _split_bucket_url(url)
        backend = _import_backend("gs", "GCSStorage")(bucket, prefix, **options)
    else:
        raise ValueError(
            f"unsupported storage URL {url!r}: use s3://, gs://, file://, a local path or memory://"
        )
    store = RetryingStorage(backend, retry or RetryPolicy())
    store.conditional_writes = check_option(conditional_writes)
    return store


def _import_backend(scheme: str, name: str):
    module = {"s3": "s3", "gs": "gcs"}[scheme]
    try:
        imported = __import__(f"{__name__}.{module}", fromlist=[name])
    except ImportError as exc:
        raise ImportError(f"{_INSTALL_HINTS[scheme]} ({exc})") from exc
    return getattr(imported, name)
