"""The "store-reported" checksum check compares what S3 says it stored, not the client's own CRC32C
(issue 12, item 3).  An HTTP proxy in front of moto rewrites the checksum S3 reports."""

from __future__ import annotations

import base64
import logging

import pytest
import torch
from fault_proxy import FaultProxy

import cloudckpt.storage.s3_checksums as s3_checksums
from cloudckpt import CheckpointManager, CorruptCheckpoint, TransferConfig
from cloudckpt.storage.s3 import S3Storage

MiB = 1024 * 1024
HEADER = "x-amz-checksum-crc32c"
WRONG = base64.b64encode(b"\x00\x00\x00\x01").decode()
SMALL = TransferConfig(chunk_size=256 * 1024, pack_threshold=64 * 1024)
#: One 6 MiB chunk sent as a 5 MiB and a 1 MiB part.
MULTIPART = TransferConfig(chunk_size=8 * MiB, multipart_threshold=5 * MiB, part_size=5 * MiB)


def _forge(when):
    """A rewrite that replaces the reported CRC32C of the answers ``when(method, path)`` selects."""
    def rewrite(method: str, path: str, headers: list[tuple[str, str]]) -> list[tuple[str, str]]:
        if not when(method, path):
            return headers
        return [(k, WRONG if k.lower() == HEADER else v) for k, v in headers]
    return rewrite


def _strip(method: str, path: str, headers: list[tuple[str, str]]) -> list[tuple[str, str]]:
    return [(k, v) for k, v in headers if not k.lower().startswith("x-amz-checksum")]


def _save(proxy: FaultProxy, bucket: str, transfer: TransferConfig, tensor: torch.Tensor):
    store = S3Storage(bucket, "runs/exp", endpoint_url=proxy.endpoint_url)
    try:
        return CheckpointManager(store, transfer=transfer, capture_rng=False).save({"w": tensor}, step=1)
    finally:
        store.close()


def _committed(moto_s3, bucket: str) -> list[str]:
    with S3Storage(bucket, "runs/exp", endpoint_url=moto_s3.endpoint_url) as store:
        return [i.name for i in CheckpointManager(store, capture_rng=False).list()]


@pytest.mark.parametrize("case", ["PutObject", "UploadPart", "after CompleteMultipartUpload"])
def test_a_store_reporting_another_checksum_fails_the_save(moto_s3, case):
    bucket = moto_s3.new_bucket()
    transfer, tensor = (SMALL, torch.randn(100_000)) if case == "PutObject" else (MULTIPART, torch.randn(6 * MiB // 4))
    when = {
        "PutObject": lambda m, p: m == "PUT" and "/chunks/" in p and "partNumber" not in p,
        "UploadPart": lambda m, p: m == "PUT" and "partNumber=2" in p,
        "after CompleteMultipartUpload": lambda m, p: m == "HEAD" and "/chunks/" in p,
    }[case]
    with FaultProxy(moto_s3.endpoint_url, rewrite=_forge(when)) as proxy:
        with pytest.raises(CorruptCheckpoint, match="reports"):
            _save(proxy, bucket, transfer, tensor)
    assert _committed(moto_s3, bucket) == []


def test_a_store_reporting_no_checksum_is_logged_once_and_checked_by_size(moto_s3, caplog, monkeypatch):
    monkeypatch.setattr(s3_checksums, "_SILENT_STORES", set())
    bucket = moto_s3.new_bucket()
    with FaultProxy(moto_s3.endpoint_url, rewrite=_strip) as proxy, caplog.at_level(logging.WARNING):
        _save(proxy, bucket, SMALL, torch.randn(100_000))
    warnings = [r for r in caplog.records if "reports no CRC32C" in r.getMessage()]
    assert len(warnings) == 1 and "read-back" in warnings[0].getMessage()
    assert _committed(moto_s3, bucket) == ["checkpoint_step_00000001.ckpt"]


def test_the_reported_checksum_is_the_stores(moto_s3):
    """Untouched answers: what S3 reports for a put and a multipart upload is the bytes' CRC32C."""
    from cloudckpt.hashing import crc32c_hex
    from cloudckpt.storage import upload_multipart

    data = bytes(range(256)) * (6 * MiB // 256)
    with S3Storage(moto_s3.new_bucket(), "p", endpoint_url=moto_s3.endpoint_url) as store:
        assert store.put("small", data[:1000]).crc32c == crc32c_hex(data[:1000])
        assert upload_multipart(store, "big", data, part_size=5 * MiB).crc32c == crc32c_hex(data)
