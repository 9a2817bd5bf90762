"""A ranged read whose answer ends before its announced length is a transient failure, not damage.

http.client does not raise when a connection closes before Content-Length bytes arrived; a
read straight from the socket then came back short, and restore quarantined a sound checkpoint
as "chunk is shorter than the manifest says".  Through fault_proxy's ``truncate`` (the full
length announced, half the body sent, then a clean close), the read must fail as transient and
its retry return every byte.
"""

from __future__ import annotations

import os

import pytest
from fault_proxy import FaultProxy, Rule
from http_util import http_store

from cloudckpt.errors import TransientError
from cloudckpt.storage import RetryPolicy


def test_a_ranged_read_cut_short_is_retried_not_taken_for_damage(moto_s3):
    bucket = moto_s3.new_bucket()
    data = os.urandom(1 << 20)
    http_store("s3", bucket, moto_s3.endpoint_url).put("object", data)
    cut_once = Rule(lambda method, path, body: method == "GET" and path.split("?")[0].endswith("/object"), "truncate")
    with FaultProxy(moto_s3.endpoint_url, rules=[cut_once]) as proxy:
        once = http_store("s3", bucket, proxy.endpoint_url, policy=RetryPolicy(max_attempts=1))
        buffer = memoryview(bytearray(len(data) - 100))
        with pytest.raises(TransientError, match="ended after"):
            once.read_into("object", buffer, offset=100)
        cut_once.hits = 0
        retrying = http_store("s3", bucket, proxy.endpoint_url)
        assert retrying.read_into("object", buffer, offset=100) == len(buffer)
        assert bytes(buffer) == data[100:]
        assert [entry.outcome for entry in proxy.log].count("truncate") == 2
