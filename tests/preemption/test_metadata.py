"""EC2 spot and GCE preemption notices, from a local fake metadata server, through to exit 75 and resume."""

from __future__ import annotations

import threading
import time
import urllib.error
import urllib.request

import pytest

from cloudckpt.preemption import EXIT_PREEMPTED, PreemptionWatcher
from fake_metadata import EC2_ACTION, EC2_TOKEN, GCE_PREEMPTED, READY, FakeMetadataServer
from preempt_helpers import assert_bit_identical_end, assert_trace_follows, checkpoints, run, start, step_name, step_of

POLL = 0.02  # seconds between polls in these tests (the default is 5 s)
PATHS = {"ec2": EC2_ACTION, "gce": GCE_PREEMPTED}
NO_NOTICE = {"ec2": 404, "gce": 200}  # what a poll answers before any notice
REASONS = {"ec2": "ec2-spot-interruption", "gce": "gce-preempted"}


@pytest.fixture
def metadata():
    server = FakeMetadataServer()
    yield server
    server.stop()


def switch_on(server: FakeMetadataServer, provider: str) -> None:
    server.interrupt_ec2() if provider == "ec2" else server.preempt_gce()


def watched(watcher: PreemptionWatcher) -> threading.Event:
    """An Event set when ``watcher`` takes a notice (pollers report through ``notify``)."""
    noticed = threading.Event()
    notify = watcher.notify

    def notify_and_flag(reason: str) -> None:
        notify(reason)
        noticed.set()

    watcher.notify = notify_and_flag  # type: ignore[method-assign]
    return noticed


def poller_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name in ("cloudckpt-ec2-spot-interruption", "cloudckpt-gce-preempted")]


def assert_pollers_stopped() -> None:
    """Every poller thread ends (close() waits a while; a request in progress may finish after it)."""
    for thread in poller_threads():
        thread.join(10)
    assert poller_threads() == []


# -- the fake is faithful where it matters -------------------------------------------------------
def test_fake_metadata_server_enforces_the_imdsv2_and_gce_headers(metadata):
    def status(request: urllib.request.Request) -> int:
        try:
            with urllib.request.urlopen(request, timeout=5) as response:
                return response.status
        except urllib.error.HTTPError as exc:
            return exc.code

    url = metadata.url
    assert status(urllib.request.Request(url + EC2_TOKEN, method="PUT")) == 400  # no TTL header
    assert status(urllib.request.Request(url + EC2_ACTION)) == 401  # no token
    assert status(urllib.request.Request(url + EC2_ACTION, headers={"X-aws-ec2-metadata-token": "forged"})) == 401
    put = urllib.request.Request(url + EC2_TOKEN, method="PUT", headers={"X-aws-ec2-metadata-token-ttl-seconds": "60"})
    with urllib.request.urlopen(put, timeout=5) as response:
        token = response.read().decode()
    action = urllib.request.Request(url + EC2_ACTION, headers={"X-aws-ec2-metadata-token": token})
    assert status(action) == 404
    metadata.interrupt_ec2()
    with urllib.request.urlopen(action, timeout=5) as response:
        assert response.status == 200 and b'"action": "terminate"' in response.read()
    assert status(urllib.request.Request(url + GCE_PREEMPTED)) == 403  # no Metadata-Flavor
    gce = urllib.request.Request(url + GCE_PREEMPTED, headers={"Metadata-Flavor": "Google"})
    with urllib.request.urlopen(gce, timeout=5) as response:
        assert response.read() == b"FALSE"


# -- the watcher's pollers -----------------------------------------------------------------------
@pytest.mark.parametrize("provider", ["ec2", "gce"])
def test_watcher_notices_within_a_bounded_time_and_not_before(metadata, provider):
    watcher = PreemptionWatcher(signals=(), poll_interval=POLL, **{provider: True, f"{provider}_endpoint": metadata.url})
    noticed = watched(watcher)
    with watcher:
        # Several polls answered "no notice" (so the poller authenticates correctly) and nothing fired.
        assert metadata.wait_for(PATHS[provider], 5, status=NO_NOTICE[provider])
        assert not noticed.is_set() and watcher.notice is None
        switched_on = time.monotonic()
        switch_on(metadata, provider)
        assert noticed.wait(10), f"no notice 10 s after the {provider} metadata server announced one"
        assert watcher.notice.reason == REASONS[provider]
        assert watcher.notice.at >= switched_on
    assert_pollers_stopped()
    if provider == "ec2":
        assert metadata.count(EC2_ACTION, 401) == 0  # every poll carried a valid token
        assert metadata.count(EC2_TOKEN, method="PUT") == 1  # and the token was reused, not re-fetched


def test_ec2_poller_fetches_a_new_token_when_the_old_one_is_rejected(metadata):
    watcher = PreemptionWatcher(signals=(), ec2=True, ec2_endpoint=metadata.url, poll_interval=POLL)
    noticed = watched(watcher)
    with watcher:
        assert metadata.wait_for(EC2_ACTION, 2, status=404)
        metadata.revoke_tokens()  # e.g. the token's TTL ran out
        assert metadata.wait_for(EC2_ACTION, 1, status=401)
        assert metadata.wait_for(EC2_TOKEN, 2, method="PUT", status=200)
        polls = metadata.count(EC2_ACTION, 404)
        assert metadata.wait_for(EC2_ACTION, polls + 2, status=404)  # polling with the new token
        assert not noticed.is_set()
        metadata.interrupt_ec2()
        assert noticed.wait(10)


@pytest.mark.parametrize("provider", ["ec2", "gce"])
def test_metadata_errors_do_not_stop_the_poller(metadata, provider):
    metadata.fail_next(3)
    watcher = PreemptionWatcher(signals=(), poll_interval=POLL, **{provider: True, f"{provider}_endpoint": metadata.url})
    noticed = watched(watcher)
    with watcher:
        assert metadata.wait_for(PATHS[provider], 3, status=500)
        assert metadata.wait_for(PATHS[provider], 1, status=NO_NOTICE[provider])
        assert not noticed.is_set()
        switch_on(metadata, provider)
        assert noticed.wait(10)


def test_unreachable_metadata_server_is_harmless(metadata):
    """Off EC2/GCE the endpoints do not answer: polling fails quietly and close() still returns."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{sock.getsockname()[1]}"  # nothing listens here
    watcher = PreemptionWatcher(signals=(), ec2=True, gce=True, ec2_endpoint=dead, gce_endpoint=dead,
                                poll_interval=POLL)
    with watcher:
        assert all(t.is_alive() for t in poller_threads()) and len(poller_threads()) == 2
        assert watcher.notice is None
        watcher.notify("manual")  # other notice sources still work
    assert_pollers_stopped()
    assert watcher.notice.reason == "manual"


def test_pollers_poll_again_after_close_and_reinstall(metadata):
    """Regression: close() set the stop flag for good, so a reinstalled watcher never polled."""
    watcher = PreemptionWatcher(signals=(), gce=True, gce_endpoint=metadata.url, poll_interval=POLL)
    noticed = watched(watcher)
    with watcher:
        assert metadata.wait_for(GCE_PREEMPTED, 2)
    assert_pollers_stopped()
    polls = metadata.count(GCE_PREEMPTED)
    with watcher:  # e.g. a second trainer.fit() with the same callback
        assert metadata.wait_for(GCE_PREEMPTED, polls + 2), "the reinstalled poller never polled"
        metadata.preempt_gce()
        assert noticed.wait(10)


def test_both_pollers_stop_once_one_of_them_fired(metadata):
    watcher = PreemptionWatcher(signals=(), ec2=True, gce=True, ec2_endpoint=metadata.url,
                                gce_endpoint=metadata.url, poll_interval=POLL)
    noticed = watched(watcher)
    with watcher:
        assert metadata.wait_for(GCE_PREEMPTED, 2) and metadata.wait_for(EC2_ACTION, 2, status=404)
        threads = poller_threads()
        metadata.preempt_gce()
        assert noticed.wait(10) and watcher.notice.reason == "gce-preempted"
        for thread in threads:  # the EC2 poller sees the notice and ends on its own
            thread.join(10)
            assert not thread.is_alive()


# -- a real training process, preempted by the metadata notice ------------------------------------
@pytest.mark.parametrize("provider", ["ec2", "gce"])
def test_metadata_notice_makes_a_trainer_checkpoint_exit_75_and_resume_bit_identical(
        metadata, provider, reference, tmp_path):
    ref, reference_root = reference
    root = str(tmp_path / "ckpt")
    stop = 12
    options = {provider: metadata.url, "poll_interval": POLL}
    worker = start(f"{provider} preempted", root, tmp_path, **options, wait_at=stop, ready_url=metadata.url + READY)
    assert metadata.ready.wait(60), worker.wait(1).describe() if not worker.process.is_alive() else "worker never got ready"
    assert metadata.ready_steps == [stop]
    assert worker.process.is_alive()  # at step 12, waiting: no notice yet, nothing ended early
    switch_on(metadata, provider)
    preempted = worker.wait()

    assert preempted.exitcode == EXIT_PREEMPTED, preempted.describe()
    result = preempted.result
    assert (result["status"], result["reason"], result["step"]) == ("preempted", REASONS[provider], stop)
    assert result["committed"] == [n for n in ref.result["committed"] if step_of(n) < stop] + [step_name(stop)]
    latest = checkpoints(root)[-1]
    assert (latest.name, latest.reason) == (step_name(stop), "preemption")
    assert_trace_follows(ref, preempted)

    metadata.reset()  # the new machine has no notice
    resumed = run(f"{provider} resumed", root, tmp_path, **options)
    assert resumed.exitcode == 0, resumed.describe()
    assert resumed.result["resumed_from"] == step_name(stop)
    assert_trace_follows(ref, resumed)
    assert_bit_identical_end(ref, resumed, root, reference_root)
