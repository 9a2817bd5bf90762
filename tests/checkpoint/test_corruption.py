"""Promise 4: every stored byte is checked; damage raises a typed error naming the object,
and restoring "latest" falls back to the previous checkpoint that verifies."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable

import pytest
import torch
from ckpt_util import assert_same_tree, make_store

from cloudckpt import (
    CheckpointManager,
    CorruptCheckpoint,
    FormatVersionError,
    NotFound,
    TransferConfig,
)
from cloudckpt.format.manifest import canonical_sha256
from cloudckpt.pointers import LATEST_POINTER, Pointer
from cloudckpt.storage import Storage

KiB = 1024
C1, C2 = "checkpoint_step_00000001.ckpt", "checkpoint_step_00000002.ckpt"
TRANSFER = TransferConfig(chunk_size=64 * KiB, pack_threshold=16 * KiB)


def _state(seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"model": {"w": torch.randn(120, 200, generator=g), "b": torch.randn(7, generator=g)},
            "progress": {"step": seed}}


def _blank() -> dict:
    return {"model": {"w": torch.zeros(120, 200), "b": torch.zeros(7)}, "progress": {"step": -1}}


@pytest.fixture(params=["memory", "local"])
def root(request, tmp_path) -> Storage:
    """A root holding two good checkpoints, 1 then 2, that share no chunk."""
    store = make_store(request.param, request, tmp_path)
    mgr = CheckpointManager(store, transfer=TRANSFER, capture_rng=False)
    mgr.save(_state(1), step=1)
    mgr.save(_state(2), step=2)
    yield store
    store.close()


def _manager(store: Storage) -> CheckpointManager:
    return CheckpointManager(store, transfer=TRANSFER, capture_rng=False)  # nothing cached


def _manifest_body(store: Storage, name: str) -> dict:
    return json.loads(store.get(name))


def _rewrite(store: Storage, key: str, change: Callable[[bytes], bytes]) -> None:
    store.put(key, change(store.get(key)))


def _chunk_of_2(store: Storage) -> str:
    ones = {c["key"] for c in _manifest_body(store, C1)["chunks"]}
    twos = [c for c in _manifest_body(store, C2)["chunks"] if c["key"] not in ones]
    assert twos and len(twos) == len(_manifest_body(store, C2)["chunks"])
    return max(twos, key=lambda c: c["size"])["key"]


def _flip(data: bytes) -> bytes:
    middle = len(data) // 2
    return data[:middle] + bytes([data[middle] ^ 0x10]) + data[middle + 1:]


def _rehashed(body: dict) -> bytes:
    body["manifest_sha256"] = canonical_sha256(body)
    return json.dumps(body, indent=1).encode()


def _version_999(store: Storage) -> None:
    body = _manifest_body(store, C2)
    body["format_version"] = 999
    store.put(C2, _rehashed(body))


def _step_digit_changed(store: Storage) -> None:  # valid JSON, wrong checksum
    _rewrite(store, C2, lambda d: d.replace(b'"step": 2', b'"step": 3', 1))


DAMAGE: dict[str, tuple[Callable[[Storage], str], type[Exception]]] = {
    "flipped_chunk_byte": (lambda s: (_rewrite(s, k := _chunk_of_2(s), _flip), k)[1], CorruptCheckpoint),
    "truncated_chunk": (lambda s: (_rewrite(s, k := _chunk_of_2(s), lambda d: d[:-5]), k)[1], CorruptCheckpoint),
    "deleted_chunk": (lambda s: (s.delete([k := _chunk_of_2(s)]), k)[1], CorruptCheckpoint),
    "truncated_manifest": (lambda s: (_rewrite(s, C2, lambda d: d[: len(d) // 2]), C2)[1], CorruptCheckpoint),
    "invalid_json": (lambda s: (s.put(C2, b'{"format": "cloudckpt", oops'), C2)[1], CorruptCheckpoint),
    "flipped_manifest_byte": (lambda s: (_step_digit_changed(s), C2)[1], CorruptCheckpoint),
    "format_version_999": (lambda s: (_version_999(s), C2)[1], FormatVersionError),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_damage_raises_a_typed_error_naming_the_object(root, damage):
    make_damage, error = DAMAGE[damage]
    key = make_damage(root)

    with pytest.raises(error) as excinfo:
        _manager(root).restore(_blank(), which=C2)
    assert key in str(excinfo.value), f"the error does not name {key}: {excinfo.value}"
    assert root.url in str(excinfo.value)

    with pytest.raises(error) as excinfo:
        _manager(root).verify(C2)
    assert key in str(excinfo.value)
    if key == C2:  # a manifest that does not read is never "latest": the newest readable one is
        assert _manager(root).latest().name == C1
    else:  # the manifest reads, so it is latest, and verifying it finds the damaged chunk
        with pytest.raises(error):
            _manager(root).verify()
    with pytest.raises(error):
        _manager(root).load(C2)
    _manager(root).verify(C1)  # the other checkpoint is fine


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_restore_latest_falls_back_to_the_previous_good_checkpoint(root, damage, caplog):
    DAMAGE[damage][0](root)
    target = _blank()
    with caplog.at_level(logging.WARNING, logger="cloudckpt"):
        info = _manager(root).restore(target)
    assert info is not None and info.name == C1
    assert_same_tree(target, _state(1))
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert any(C2 in w for w in warnings), warnings
    assert any(f"restored {C1} instead of {C2}" in w for w in warnings), warnings


def test_pointer_to_a_missing_checkpoint_falls_back_to_listing(root, caplog):
    root.put(LATEST_POINTER, Pointer("checkpoint_step_00000099.ckpt", 99).to_bytes())
    target = _blank()
    with caplog.at_level(logging.WARNING, logger="cloudckpt"):
        info = _manager(root).restore(target)
    assert info.name == C2
    assert_same_tree(target, _state(2))
    assert any("checkpoint_step_00000099.ckpt" in r.getMessage() and "does not exist" in r.getMessage()
               for r in caplog.records)


@pytest.mark.parametrize("pointer", [b"{not json", b'{"format": "cloudckpt-pointer", "target": "../x", "step": 1}',
                                     None])
def test_unreadable_or_missing_pointer_falls_back_to_listing(root, pointer, caplog):
    if pointer is None:
        root.delete([LATEST_POINTER])
    else:
        root.put(LATEST_POINTER, pointer)
    target = _blank()
    with caplog.at_level(logging.WARNING, logger="cloudckpt"):
        assert _manager(root).restore(target).name == C2
    assert_same_tree(target, _state(2))
    if pointer is not None:
        assert any(LATEST_POINTER in r.getMessage() for r in caplog.records)


def test_nothing_verifies_raises_the_first_error(root):
    _rewrite(root, _chunk_of_2(root), _flip)
    _rewrite(root, C1, lambda d: d[:100])
    with pytest.raises(CorruptCheckpoint) as excinfo:
        _manager(root).restore(_blank())
    assert "chunks/" in str(excinfo.value)


def test_only_checkpoint_damaged_and_no_pointer_fails_closed():
    mgr = CheckpointManager("memory://", capture_rng=False)
    mgr.save(_state(1), step=1)
    mgr.store.delete([LATEST_POINTER])
    mgr.store.put(C1, b"{truncated")
    with pytest.raises(CorruptCheckpoint):
        _manager(mgr.store).restore(_blank())


# -- manifests are hostile input: a consistent (re-hashed) but malformed manifest is refused ------

def _tamper(store: Storage, change: Callable[[dict], None]) -> None:
    body = _manifest_body(store, C2)
    change(body)
    store.put(C2, _rehashed(body))


HOSTILE: dict[str, Callable[[dict], None]] = {
    "tensor_index_out_of_range": lambda b: b["state"]["model"]["__state_dict__"].__setitem__("w", {"__tensor__": 99})
    if "__state_dict__" in b["state"]["model"] else b["state"]["model"].__setitem__("w", {"__tensor__": 99}),
    "unknown_dtype": lambda b: b["tensors"][0].__setitem__("dtype", "float128"),
    "nbytes_disagrees_with_shape": lambda b: b["tensors"][0].__setitem__("shape", [120, 201]),
    "segment_past_chunk_end": lambda b: b["tensors"][0]["segments"][0].__setitem__(1, 10**6),
}


@pytest.mark.parametrize("change", list(HOSTILE))
def test_malformed_but_checksummed_manifest_is_corrupt(root, change):
    _tamper(root, HOSTILE[change])
    with pytest.raises(CorruptCheckpoint) as excinfo:
        _manager(root).restore(_blank(), which=C2)
    assert C2 in str(excinfo.value)
    target = _blank()
    assert _manager(root).restore(target).name == C1
    assert_same_tree(target, _state(1))


def test_out_of_range_number_in_manifest_is_corrupt(root):
    """1e999 parses as inf, which the canonical checksum JSON cannot hold."""
    _rewrite(root, C2, lambda d: d.replace(b'"step": 2', b'"step": 1e999', 1))
    with pytest.raises(CorruptCheckpoint) as excinfo:
        _manager(root).restore(_blank(), which=C2)
    assert C2 in str(excinfo.value)
    assert _manager(root).restore(_blank()).name == C1


def test_missing_checkpoint_name_is_not_found(root):
    with pytest.raises(NotFound):
        _manager(root).restore(_blank(), which="checkpoint_step_00000042.ckpt")
