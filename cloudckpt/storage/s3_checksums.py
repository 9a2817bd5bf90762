"""What S3 reports about the checksums of stored objects.

cloudckpt sends a CRC32C with every PutObject and UploadPart (S3 rejects a body that does not
match it) and asks for full-object CRC32C on multipart uploads.  What S3 *returns* is the check
that the store holds what was sent: the writer compares it with the manifest's CRC32C.  Some
S3-compatible stores return none; that is logged once per store, and uploads there are checked
by size only (``TransferConfig(verify="read-back")`` re-reads them).
"""

from __future__ import annotations

import logging
from typing import Any

from ..hashing import crc32c_hex_from_b64

log = logging.getLogger("cloudckpt.storage.s3")


def full_object_crc32c(response: dict[str, Any]) -> str | None:
    """The object's CRC32C (hex) if S3 reported one covering the whole object."""
    value = response.get("ChecksumCRC32C")
    if not value or "-" in value or response.get("ChecksumType", "FULL_OBJECT") != "FULL_OBJECT":
        return None
    return crc32c_hex_from_b64(value)


_SILENT_STORES: set[str] = set()


def reported_crc32c(url: str, response: dict[str, Any]) -> str | None:
    """The full-object CRC32C (hex) that S3 reported in ``response``; None, logged once per store, when
    it reported none (some S3-compatible stores): uploads are then checked by size only."""
    crc = full_object_crc32c(response)
    if crc is None and url not in _SILENT_STORES:
        _SILENT_STORES.add(url)
        log.warning("%s reports no CRC32C of what it stored; uploads are checked by their size only. "
                    "TransferConfig(verify='read-back') reads every chunk back before the commit.", url)
    return crc
