"""S3 bodies move without copies, and without a second hash of the payload (real moto server)."""

from __future__ import annotations

import os

import pytest

from cloudckpt.errors import CorruptCheckpoint
from cloudckpt.storage.s3 import S3Storage
from cloudckpt.storage.s3_body import BufferReader


@pytest.fixture
def store(moto_s3):
    with S3Storage(moto_s3.new_bucket(), "body", endpoint_url=moto_s3.endpoint_url) as s3:
        yield s3


def test_request_body_blocks_are_slices_of_the_callers_memory():
    data = bytearray(b"abcdefgh")
    reader = BufferReader(memoryview(data)[2:])
    block = reader.read(3)
    data[2] = ord("Z")  # a copy would not see this
    assert bytes(block) == b"Zde" and reader.tell() == 3
    assert bytes(reader.read()) == b"fgh" and len(reader.read(5)) == 0


def test_put_sends_its_crc32c_and_no_payload_hash(store):
    sent = {}
    store._client.meta.events.register(
        "before-send.s3.PutObject",
        lambda request, **_: sent.update({k.lower(): v.decode() if isinstance(v, bytes) else v
                                          for k, v in request.headers.items()}))
    store.put("k", memoryview(os.urandom(1 << 20)))
    assert sent["x-amz-content-sha256"] == "UNSIGNED-PAYLOAD"  # not a SHA-256 pass over every byte
    assert "x-amz-checksum-crc32c" in sent and "x-amz-checksum-crc32" not in sent


def test_ranged_reads_land_in_place_and_the_connection_stays_usable(store):
    data = os.urandom(3 << 20)
    store.put("big", data)
    buffer = bytearray(len(data))
    step = 256 << 10
    for start in range(0, len(data), step):
        assert store.read_into("big", memoryview(buffer)[start:start + step], start) == min(step, len(data) - start)
    assert buffer == data
    assert store.get("big", range=(5, 9)) == data[5:9]  # the pool serves the next request as usual


def test_a_store_that_ignores_the_range_is_refused(store, monkeypatch):
    store.put("k", b"0123456789")
    get_object = store._client.get_object

    def without_range(**kwargs):
        kwargs.pop("Range")
        return get_object(**kwargs)

    monkeypatch.setattr(store._client, "get_object", without_range)
    with pytest.raises(CorruptCheckpoint, match="asked for bytes from 4"):
        store.read_into("k", memoryview(bytearray(3)), 4)
