"""SIGTERM at many moments of a real training process -> one preemption checkpoint, exit 75, exact resume.

Every worker is a separate process running examples/spot_training.py's worker (see
preempt_worker.py).  It sends itself SIGTERM at a chosen step and moment; a new process resumes
from what it saved.  The resumed run must end bit-identical to an uninterrupted run (parameters,
optimizer state, scheduler, sampler, progress, RNG), and after every step it took its whole state
must equal the uninterrupted run's after that step.
"""

from __future__ import annotations

import signal
import threading
from dataclasses import dataclass

import pytest
import torch

import cloudckpt
from cloudckpt.preemption import EXIT_PREEMPTED, Preempted, PreemptionWatcher
from preempt_helpers import (
    Outcome,
    assert_bit_identical_end,
    assert_trace_follows,
    checkpoints,
    context,
    epoch_name,
    run,
    start,
    step_name,
    step_of,
)
from preempt_worker import CONFIG, STEPS_PER_EPOCH, nested_signal_while_recording


@dataclass(frozen=True)
class Point:
    """Where the SIGTERM lands: at step ``at``, in ``phase`` (see spot_training.SelfPreempt)."""

    phase: str
    at: int

    @property
    def id(self) -> str:
        return f"{self.phase}@{self.at}"

    @property
    def checkpoint_step(self) -> int:
        """The step boundary that sees the notice: the signal's own, or the next one if that one had passed."""
        return self.at + 1 if self.phase in ("after-save", "epoch-end") else self.at

    @property
    def in_flight(self) -> str | None:
        """The save still uploading when the signal lands (held open until the notice arrived)."""
        if self.phase == "after-save":
            assert self.at % CONFIG["save_every"] == 0, "after-save points sit on a periodic save"
            return step_name(self.at)
        if self.phase == "epoch-end":
            assert self.at % STEPS_PER_EPOCH == 0, "epoch-end points sit on an epoch end"
            return epoch_name(self.at // STEPS_PER_EPOCH)
        return None

    def options(self) -> dict:
        return dict(preempt_at=self.at, phase=self.phase, hold=[self.in_flight] if self.in_flight else [])


# 18 steps an epoch, a periodic save every 8 steps, 50 steps in all.
POINTS = [
    Point("after-save", 8),    # the save of step 8 is uploading when SIGTERM lands
    Point("before-save", 18),  # the last step of epoch 1, before the epoch's validation and save
    Point("mid-step", 23),     # during the forward pass of step 23
    Point("before-save", 24),  # a periodic-save step: the preemption save takes its place
    Point("epoch-end", 36),    # epoch 2's end-of-epoch save is uploading when SIGTERM lands
    Point("after-save", 40),   # another in-flight upload, later in the run
    Point("before-save", 50),  # the very last step: the resumed process only has to finish
]


@dataclass
class Story:
    preempted: Outcome
    listed: list  # the checkpoints under root when the preempted process had exited
    resumed: Outcome
    root: str


@pytest.fixture(scope="module")
def local_runs(reference, tmp_path_factory) -> dict[str, Story]:
    """Every point's preempted run (all at once), then every resumed run (all at once)."""
    started = {}
    for point in POINTS:
        workdir = tmp_path_factory.mktemp(point.id.replace("@", "-"))
        started[point.id] = start(f"preempted {point.id}", str(workdir / "ckpt"), workdir, **point.options())
    preempted = {key: (run_.wait(), checkpoints(run_.root)) for key, run_ in started.items()}
    resumed = {key: start(f"resumed {key}", run_.root, run_.result_path.parent) for key, run_ in started.items()}
    return {key: Story(preempted[key][0], preempted[key][1], resumed[key].wait(), started[key].root)
            for key in started}


def check_preempted(point: Point, outcome: Outcome, reference: Outcome, listed: list) -> None:
    assert outcome.exitcode == EXIT_PREEMPTED, outcome.describe()
    result = outcome.result
    assert result is not None and result["status"] == "preempted" and result["reason"] == "SIGTERM", outcome.describe()
    stop = point.checkpoint_step
    assert result["signal_step"] == point.at and result["step"] == stop, outcome.describe()

    # Exactly the saves an uninterrupted run makes before that step, then one preemption
    # checkpoint: nothing saved twice, nothing lost, nothing out of order.
    before = [name for name in reference.result["committed"] if step_of(name) < stop]
    assert result["committed"] == before + [step_name(stop)], outcome.describe()
    assert result["overlaps"] == [], "two saves ran at once: " + "; ".join(result["overlaps"])
    if point.in_flight:
        assert result["saving_at_signal"] is True and result["held"] == [point.in_flight], outcome.describe()

    latest = listed[-1]
    assert (latest.name, latest.step, latest.reason) == (step_name(stop), stop, "preemption")
    assert "latest.ckpt" in latest.pointers
    assert [i.name for i in listed if i.reason == "preemption"] == [step_name(stop)]
    if point.in_flight:  # the upload in flight when the signal came was committed, and kept
        assert point.in_flight in {i.name for i in listed}

    # The process stopped with exactly the state the uninterrupted run had after that step.
    assert_trace_follows(reference, outcome)
    assert result["state_sha256"] == reference.trace[stop], outcome.describe()
    assert result["handler_after"] == "SIG_DFL", "the watcher did not restore SIGTERM's handler"


def check_resumed(point: Point, outcome: Outcome, reference: Outcome, root: str, reference_root: str,
                  storage_options: dict | None = None) -> None:
    assert outcome.exitcode == 0, outcome.describe()
    result = outcome.result
    stop = point.checkpoint_step
    assert result["resumed_from"] == step_name(stop) and result["resumed_step"] == stop, outcome.describe()
    assert sorted(outcome.trace) == list(range(stop + 1, CONFIG["steps"] + 1)), outcome.describe()
    assert_trace_follows(reference, outcome)
    # Everything the uninterrupted run committed after the stop, and, when the stop was an epoch's
    # last step, that epoch's end-of-epoch save too (it carries the epoch's validation metrics).
    assert result["committed"] == [n for n in reference.result["committed"]
                                   if step_of(n) > stop or (step_of(n) == stop and "_epoch_" in n)]
    assert result["overlaps"] == []
    assert_bit_identical_end(reference, outcome, root, reference_root, storage_options)


@pytest.mark.parametrize("point", POINTS, ids=lambda p: p.id)
def test_sigterm_saves_one_preemption_checkpoint_and_exits_75(point, local_runs, reference):
    story = local_runs[point.id]
    check_preempted(point, story.preempted, reference[0], story.listed)


@pytest.mark.parametrize("point", POINTS, ids=lambda p: p.id)
def test_resumed_run_is_bit_identical_to_an_uninterrupted_one(point, local_runs, reference):
    story = local_runs[point.id]
    check_resumed(point, story.resumed, reference[0], story.root, reference[1])


def test_sigterm_during_a_save_waits_for_it_and_starts_no_second_save(local_runs):
    """The commit of step 8 is held open until the notice arrived; the preemption save comes after it."""
    story = local_runs[Point("after-save", 8).id]
    result = story.preempted.result
    assert result["saving_at_signal"] is True
    assert result["held"] == [step_name(8)]
    assert result["committed"] == [step_name(8), step_name(9)]  # in this order, once each
    assert result["overlaps"] == []
    assert [(i.name, i.reason) for i in story.listed] == [(step_name(8), "periodic"), (step_name(9), "preemption")]


def test_preempted_twice_still_ends_bit_identical(reference, tmp_path):
    ref, reference_root = reference
    root = str(tmp_path / "ckpt")
    first = run("twice: first", root, tmp_path, preempt_at=8, phase="after-save", hold=[step_name(8)])
    assert first.exitcode == EXIT_PREEMPTED and first.result["step"] == 9, first.describe()
    second = run("twice: second", root, tmp_path, preempt_at=30, phase="mid-step")
    assert second.exitcode == EXIT_PREEMPTED, second.describe()
    assert (second.result["resumed_from"], second.result["step"]) == (step_name(9), 30), second.describe()
    third = run("twice: third", root, tmp_path)
    assert third.exitcode == 0 and third.result["resumed_from"] == step_name(30), third.describe()
    for outcome in (first, second, third):
        assert_trace_follows(ref, outcome)
    assert_bit_identical_end(ref, third, root, reference_root)


def test_s3_preempted_during_upload_resumes_bit_identical(reference, moto_s3, tmp_path):
    from servers import AWS_TEST_ENV

    ref, reference_root = reference
    root = f"s3://{moto_s3.new_bucket()}/spot"
    options = {"endpoint_url": moto_s3.endpoint_url}
    point = Point("after-save", 16)
    common = dict(storage_options=options, env=AWS_TEST_ENV)
    preempted = run("s3 preempted", root, tmp_path, **point.options(), **common)
    check_preempted(point, preempted, ref, checkpoints(root, options))
    resumed = run("s3 resumed", root, tmp_path, **common)
    check_resumed(point, resumed, ref, root, reference_root, options)


# -- the watcher itself, in this process ---------------------------------------------------------
@pytest.fixture
def sigterm_restored():
    """Whatever a test does to SIGTERM's handler, put the original back."""
    original = signal.getsignal(signal.SIGTERM)
    yield
    signal.signal(signal.SIGTERM, original)


def test_handler_chains_to_the_previous_python_handler_and_close_restores_it(sigterm_restored):
    calls = []

    def previous(signum, frame):
        calls.append(signum)

    signal.signal(signal.SIGTERM, previous)
    watcher = PreemptionWatcher().install()
    assert signal.getsignal(signal.SIGTERM) != previous
    signal.raise_signal(signal.SIGTERM)  # handlers run before raise_signal returns
    assert watcher.requested and watcher.notice.reason == "SIGTERM"
    assert calls == [signal.SIGTERM]
    watcher.close()
    assert signal.getsignal(signal.SIGTERM) is previous
    signal.raise_signal(signal.SIGTERM)
    assert calls == [signal.SIGTERM, signal.SIGTERM]


def test_close_restores_ignored_and_default_handlers(sigterm_restored):
    for original in (signal.SIG_IGN, signal.SIG_DFL):
        signal.signal(signal.SIGTERM, original)
        with PreemptionWatcher() as watcher:
            signal.raise_signal(signal.SIGTERM)  # SIG_IGN / SIG_DFL are not called: the process lives
            assert watcher.requested
        assert signal.getsignal(signal.SIGTERM) == original


def test_nested_watchers_both_see_the_signal_and_unwind_in_order(sigterm_restored):
    calls = []
    signal.signal(signal.SIGTERM, lambda signum, frame: calls.append(signum))
    original = signal.getsignal(signal.SIGTERM)
    with PreemptionWatcher() as outer:
        with PreemptionWatcher() as inner:
            signal.raise_signal(signal.SIGTERM)
            assert inner.requested and outer.requested and calls == [signal.SIGTERM]
        assert signal.getsignal(signal.SIGTERM) == outer._on_signal
    assert signal.getsignal(signal.SIGTERM) is original


def test_sigint_does_not_chain_to_default_int_handler():
    """With signals=(SIGINT,), Ctrl-C means "checkpoint and exit", not KeyboardInterrupt mid-step."""
    original = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with PreemptionWatcher(signals=(signal.SIGINT,)) as watcher:
            signal.raise_signal(signal.SIGINT)  # would raise KeyboardInterrupt if chained
            assert watcher.notice.reason == "SIGINT"
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:
        signal.signal(signal.SIGINT, original)


def test_a_signal_while_the_notice_is_being_recorded_does_not_deadlock():
    """Regression: a non-reentrant lock deadlocked the main thread (and swallowed later SIGTERMs)."""
    process = context().Process(target=nested_signal_while_recording, daemon=True)
    process.start()
    process.join(60)
    if process.is_alive():
        process.kill()
        process.join(10)
        pytest.fail("the process deadlocked in the SIGTERM handler")
    assert process.exitcode == 0


def test_watcher_without_signals_touches_no_handler_and_takes_custom_notices(sigterm_restored):
    before = signal.getsignal(signal.SIGTERM)
    now = [100.0]
    watcher = PreemptionWatcher(signals=(), deadline=10.0, clock=lambda: now[0])
    with watcher:
        assert signal.getsignal(signal.SIGTERM) is before
        assert watcher.notice is None and not watcher.requested and watcher.remaining() == 10.0
        watcher.notify("maintenance")
        now[0] = 104.0
        watcher.notify("later")  # the first notice wins
        assert watcher.notice.reason == "maintenance" and watcher.notice.at == 100.0
        assert watcher.remaining() == 6.0
        now[0] = 200.0
        assert watcher.remaining() == 0.0
    assert signal.getsignal(signal.SIGTERM) is before


def test_watcher_without_signals_installs_off_the_main_thread_and_with_signals_says_why_not():
    errors: list[BaseException] = []

    def body() -> None:
        try:
            PreemptionWatcher(signals=()).install().close()
            with pytest.raises(ValueError, match="main thread"):
                PreemptionWatcher().install()
        except BaseException as exc:  # reported on the test's thread
            errors.append(exc)

    thread = threading.Thread(target=body)
    thread.start()
    thread.join(30)
    assert not thread.is_alive() and errors == []


def test_callback_with_a_signal_free_watcher_checkpoints_and_raises_preempted(sigterm_restored):
    """A custom notice source (no signals at all) drives the same preemption path, in process."""
    before = signal.getsignal(signal.SIGTERM)
    watcher = PreemptionWatcher(signals=())

    class Notify(cloudckpt.Callback):
        def on_step_end(self, trainer, step, logs):
            if step == 5:
                watcher.notify("maintenance")

    torch.manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.randn(64, 4), torch.randn(64, 1))
    loader = torch.utils.data.DataLoader(data, batch_size=8, sampler=cloudckpt.ResumableSampler(data))
    model = torch.nn.Linear(4, 1)
    store = cloudckpt.MemoryStorage()
    callback = cloudckpt.CheckpointCallback(store, save_every_n_steps=3, async_save=True, preemption=watcher)
    trainer = cloudckpt.Trainer(model, torch.optim.SGD(model.parameters(), lr=0.1),
                                loader, lambda m, b: torch.nn.functional.mse_loss(m(b[0]), b[1]),
                                callbacks=[Notify(), callback], max_steps=20)
    with pytest.raises(Preempted) as raised:
        trainer.fit()
    assert raised.value.code == EXIT_PREEMPTED and raised.value.reason == "maintenance"
    assert trainer.global_step == 5
    assert [(i.step, i.reason) for i in callback.manager.list()] == [(3, "periodic"), (5, "preemption")]
    assert signal.getsignal(signal.SIGTERM) is before
    callback.manager.close()


def test_preempted_on_the_last_step_of_an_epoch_still_records_that_epochs_metrics(sigterm_restored):
    torch.manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.randn(32, 4), torch.randn(32, 1))
    store = cloudckpt.MemoryStorage()

    def fit(watcher: PreemptionWatcher | None, notify_at: int | None) -> list[cloudckpt.CheckpointInfo]:
        class Notify(cloudckpt.Callback):
            def on_step_end(self, trainer, step, logs):
                if watcher is not None and step == notify_at:
                    watcher.notify("maintenance")

        loader = torch.utils.data.DataLoader(data, batch_size=8, sampler=cloudckpt.ResumableSampler(data))
        model = torch.nn.Linear(4, 1)
        callback = cloudckpt.CheckpointCallback(store, save_best=True, monitor="val_loss", preemption=watcher)
        trainer = cloudckpt.Trainer(model, torch.optim.SGD(model.parameters(), lr=0.1), loader,
                                    lambda m, b: torch.nn.functional.mse_loss(m(b[0]), b[1]),
                                    val_loader=loader, callbacks=[Notify(), callback], max_epochs=2)
        try:
            trainer.fit()
        except Preempted:
            assert trainer.global_step == notify_at
        listed = callback.manager.list()
        callback.manager.close()
        return listed

    fit(PreemptionWatcher(signals=()), notify_at=4)  # 4 steps an epoch: preempted on epoch 1's last step
    listed = fit(None, None)
    epochs_with_metrics = sorted(i.epoch for i in listed if "val_loss" in i.metrics)
    assert epochs_with_metrics == [1, 2], [(i.name, i.epoch, i.metrics) for i in listed]
