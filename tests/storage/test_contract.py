"""One contract, every backend: memory, local disk, S3 (moto server), GCS (fake-gcs-server)."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from cloudckpt.errors import AlreadyExists, CorruptCheckpoint, InvalidKey, NotFound, PreconditionFailed
from servers import make_store

from cloudckpt.storage import IfMatch, Storage, upload_multipart

BACKENDS = ["memory", "local", "s3", "gcs"]


@pytest.fixture(params=BACKENDS)
def store(request, tmp_path) -> Storage:
    backend = make_store(request.param, request, tmp_path)
    yield backend
    backend.close()


def _parallel(fn, items, workers=16):
    with ThreadPoolExecutor(workers) as pool:
        return list(pool.map(fn, items))


def test_put_get_overwrite(store):
    info = store.put("a/b.bin", b"hello")
    assert info.size == 5 and info.key == "a/b.bin"
    assert store.get("a/b.bin") == b"hello"
    store.put("a/b.bin", b"world!")
    assert store.get("a/b.bin") == b"world!"
    assert store.head("a/b.bin").size == 6


def test_put_accepts_memoryview_and_bytearray(store):
    store.put("mv", memoryview(b"0123456789")[2:6])
    store.put("ba", bytearray(b"xyz"))
    assert store.get("mv") == b"2345"
    assert store.get("ba") == b"xyz"


def test_create_refuses_existing_key_and_keeps_old_bytes(store):
    store.put("commit.ckpt", b"first", mode="create")
    with pytest.raises(AlreadyExists) as excinfo:
        store.put("commit.ckpt", b"second", mode="create")
    assert "commit.ckpt" in str(excinfo.value)
    assert isinstance(excinfo.value, FileExistsError)
    assert store.get("commit.ckpt") == b"first"


def test_if_match_swaps_only_the_version_it_read(store):
    first = store.put("latest.ckpt", b"v1")
    second = store.put("latest.ckpt", b"v2", mode=IfMatch(first.token))
    assert store.get("latest.ckpt") == b"v2"
    with pytest.raises(PreconditionFailed):
        store.put("latest.ckpt", b"stale", mode=IfMatch(first.token))
    assert store.get("latest.ckpt") == b"v2"
    store.put("latest.ckpt", b"v3", mode=IfMatch(second.token))
    assert store.get("latest.ckpt") == b"v3"


def test_if_match_on_missing_key_fails(store):
    token = store.put("x", b"1").token
    store.delete(["x"])
    with pytest.raises(PreconditionFailed):
        store.put("x", b"2", mode=IfMatch(token))
    with pytest.raises(NotFound):
        store.head("x")


def test_head_token_matches_put_token(store):
    info = store.put("k", b"abc")
    assert store.head("k").token == info.token
    assert [i.token for i in store.list("k")] == [info.token]


def test_ranged_reads(store):
    store.put("r", b"0123456789")
    assert store.get("r", range=(0, 4)) == b"0123"
    assert store.get("r", range=(3, 7)) == b"3456"
    assert store.get("r", range=(8, 10)) == b"89"
    assert store.get("r", range=(5, 5)) == b""
    with pytest.raises(ValueError):
        store.get("r", range=(5, 2))


def test_missing_objects_raise_not_found(store):
    for call in (lambda: store.get("nope"), lambda: store.head("nope"),
                 lambda: store.get("nope", range=(0, 1))):
        with pytest.raises(NotFound) as excinfo:
            call()
        assert isinstance(excinfo.value, FileNotFoundError)
        assert "nope" in str(excinfo.value)


def test_list_by_prefix_sorted(store):
    for key in ["chunks/aa/1", "chunks/ab/2", "chunks/aa/0", "checkpoint_epoch_0001.ckpt", "latest.ckpt"]:
        store.put(key, key.encode())
    assert [i.key for i in store.list("chunks/")] == ["chunks/aa/0", "chunks/aa/1", "chunks/ab/2"]
    assert [i.key for i in store.list("chunks/aa/")] == ["chunks/aa/0", "chunks/aa/1"]
    assert [i.key for i in store.list("check")] == ["checkpoint_epoch_0001.ckpt"]
    everything = store.list("")
    assert len(everything) == 5 and all(i.size == len(i.key) for i in everything)
    assert store.list("nothing/") == []


def test_list_and_delete_more_than_a_thousand_keys(store, request):
    keys = [f"many/{i:05d}" for i in range(1100)]
    if request.node.callspec.params["store"] == "s3":  # PUT is tested above; listing is the point here
        request.getfixturevalue("moto_s3").seed(store.bucket, [f"{store.prefix}/{k}" for k in keys])
    else:
        _parallel(lambda k: store.put(k, b"x"), keys)
    store.put("keep/me", b"y")
    listed = store.list("many/")
    assert [i.key for i in listed] == keys
    store.delete(keys + ["many/never-existed"])
    assert store.list("many/") == []
    assert store.get("keep/me") == b"y"


def test_copy(store):
    store.put("src", b"payload")
    info = store.copy("src", "dir/dst")
    assert info.size == 7
    assert store.get("dir/dst") == b"payload"
    assert store.get("src") == b"payload"


def test_multipart_three_parts_round_trip(store):
    part = max(store.min_part_size, 1024)
    data = bytes(range(256)) * ((3 * part + 1000) // 256)
    info = upload_multipart(store, "big/object", data, part_size=part, concurrency=4)
    assert info.size == len(data)
    assert store.get("big/object") == data
    assert store.get("big/object", range=(part - 10, part + 10)) == data[part - 10 : part + 10]
    assert store.list_pending_uploads() == []


def test_aborted_multipart_leaves_nothing(store):
    upload = store.multipart("aborted/object")
    upload.upload_part(1, b"a" * max(store.min_part_size, 16))
    upload.abort()
    with pytest.raises(NotFound):
        store.head("aborted/object")
    assert store.list("aborted/") == []
    assert store.list_pending_uploads() == []


def test_failing_part_aborts_the_whole_upload(store):
    class Boom(Exception):
        pass

    class Exploding(bytes):
        pass

    part = max(store.min_part_size, 16)
    real_multipart = store.multipart

    def multipart(key, mode="overwrite"):
        upload = real_multipart(key, mode)
        original = upload.upload_part

        def upload_part(number, data):
            if number == 2:
                raise Boom("part 2 failed")
            original(number, data)

        upload.upload_part = upload_part
        return upload

    store.multipart = multipart
    with pytest.raises(Boom):
        upload_multipart(store, "doomed", b"z" * (3 * part), part_size=part, concurrency=2)
    store.multipart = real_multipart
    with pytest.raises(NotFound):
        store.head("doomed")
    assert store.list_pending_uploads() == []


def test_multipart_create_refuses_existing_key(store):
    store.put("once", b"original")
    part = max(store.min_part_size, 16)
    with pytest.raises(AlreadyExists):
        upload_multipart(store, "once", b"n" * (2 * part), mode="create", part_size=part)
    assert store.get("once") == b"original"
    assert store.list_pending_uploads() == []


def test_multipart_if_match(store):
    info = store.put("swap", b"old")
    part = max(store.min_part_size, 16)
    upload_multipart(store, "swap", b"n" * (2 * part), mode=IfMatch(info.token), part_size=part)
    assert store.head("swap").size == 2 * part
    with pytest.raises(PreconditionFailed):
        upload_multipart(store, "swap", b"m" * (2 * part), mode=IfMatch(info.token), part_size=part)
    assert store.get("swap", range=(0, 1)) == b"n"


def test_racing_creates_have_exactly_one_winner(store):
    barrier = threading.Barrier(8)

    def attempt(i: int) -> bool:
        barrier.wait()
        try:
            store.put("race.ckpt", f"writer-{i}".encode(), mode="create")
            return True
        except AlreadyExists:
            return False

    wins = _parallel(attempt, range(8), workers=8)
    assert sum(wins) == 1
    assert store.get("race.ckpt") == f"writer-{wins.index(True)}".encode()


def test_racing_compare_and_swap_has_exactly_one_winner(store):
    token = store.put("pointer", b"start").token
    barrier = threading.Barrier(8)

    def attempt(i: int) -> bool:
        barrier.wait()
        try:
            store.put("pointer", f"writer-{i}".encode(), mode=IfMatch(token))
            return True
        except PreconditionFailed:
            return False

    wins = _parallel(attempt, range(8), workers=8)
    assert sum(wins) == 1
    assert store.get("pointer") == f"writer-{wins.index(True)}".encode()


@pytest.mark.parametrize("bad", ["", "/abs", "a/../b", "..", "a//b", "a/./b", "trailing/", "back\\slash"])
def test_unsafe_keys_are_refused(store, bad):
    with pytest.raises(InvalidKey):
        store.put(bad, b"x")
    with pytest.raises(InvalidKey):
        store.get(bad)


def test_mark_expired_accepts_keys(store):
    store.put("chunks/old", b"x")
    store.mark_expired(["chunks/old"])


def test_non_recursive_listing_stops_at_the_next_slash(store):
    for key in ["a.ckpt", "b.ckpt", "chunks/aa/1", "chunks/ab/2", ".cloudckpt/state.json", "best_model_x.ckpt"]:
        store.put(key, b"x")
    assert [i.key for i in store.list("", recursive=False)] == ["a.ckpt", "b.ckpt", "best_model_x.ckpt"]
    assert [i.key for i in store.list("best_", recursive=False)] == ["best_model_x.ckpt"]
    assert [i.key for i in store.list("chunks/aa/", recursive=False)] == ["chunks/aa/1"]


def test_read_into_fills_caller_memory(store):
    store.put("r", b"0123456789")
    buffer = bytearray(4)
    assert store.read_into("r", memoryview(buffer), 3) == 4 and buffer == b"3456"
    tail = bytearray(6)
    assert store.read_into("r", memoryview(tail), 8) == 2 and tail[:2] == b"89"
    with pytest.raises(NotFound):
        store.read_into("missing", memoryview(bytearray(1)))


def test_read_into_checks_the_expected_size_where_the_read_reports_it(store):
    store.put("r", b"0123456789")
    buffer = bytearray(4)
    assert store.read_into("r", memoryview(buffer), 0, size=10) == 4 and buffer == b"0123"
    if store.reads_check_size:
        with pytest.raises(CorruptCheckpoint, match="10 bytes, 11 were expected"):
            store.read_into("r", memoryview(buffer), 4, size=11)
    else:  # stores that cannot tell HEAD instead (the reader does)
        assert store.read_into("r", memoryview(buffer), 4, size=11) == 4
