"""Retention policies as pure functions over synthetic CheckpointInfo lists (no storage at all).

A policy answers "which names to keep"; it never deletes.  These tests pin the
answers of every built-in policy, of user callables and of ``|`` unions,
including ties, NaN / missing metrics and the validation errors.
"""

from __future__ import annotations

import datetime as dt
import math

import pytest
from cb_util import T0, info
from hypothesis import given, settings
from hypothesis import strategies as st

from cloudckpt import (
    KeepAll,
    KeepBestAndLatest,
    KeepBestK,
    KeepEvery,
    KeepLastN,
    RetentionPolicy,
)
from cloudckpt.retention import AnyOf, Custom, RetentionContext, as_policy

MIN = RetentionContext(monitor="loss", mode="min")
MAX = RetentionContext(monitor="loss", mode="max")


def _series(values, *, metric="loss", start=1):
    """One checkpoint per value, steps start, start+1, ...; None leaves the metric out."""
    return [info(f"c{step}.ckpt", step, epoch=step,
                 metrics={} if value is None else {metric: value})
            for step, value in enumerate(values, start=start)]


# -- KeepAll / KeepLastN --------------------------------------------------------------------------

def test_keep_all_keeps_every_name_and_nothing_of_nothing():
    infos = _series([3.0, 2.0, 1.0])
    assert KeepAll()(infos) == {"c1.ckpt", "c2.ckpt", "c3.ckpt"}
    assert KeepAll()([]) == set()
    assert as_policy(None)(infos) == {"c1.ckpt", "c2.ckpt", "c3.ckpt"}  # no policy = keep all


@pytest.mark.parametrize("n, expected", [
    (1, {"c5.ckpt"}),
    (3, {"c3.ckpt", "c4.ckpt", "c5.ckpt"}),
    (5, {"c1.ckpt", "c2.ckpt", "c3.ckpt", "c4.ckpt", "c5.ckpt"}),
    (99, {"c1.ckpt", "c2.ckpt", "c3.ckpt", "c4.ckpt", "c5.ckpt"}),
])
def test_keep_last_n_keeps_highest_steps(n, expected):
    infos = _series([1.0] * 5)
    assert KeepLastN(n)(infos) == expected
    assert KeepLastN(n)(list(reversed(infos))) == expected  # input order does not matter


def test_keep_last_n_orders_by_step_not_by_creation_time():
    # a zombie writer committed step 2 after step 9: the window is still by step
    infos = [info("s9.ckpt", 9, created=T0), info("s2.ckpt", 2, created=T0 + dt.timedelta(hours=1)),
             info("s5.ckpt", 5, created=T0)]
    assert KeepLastN(2)(infos) == {"s9.ckpt", "s5.ckpt"}


def test_keep_last_n_breaks_step_ties_by_created():
    # two checkpoints at step 10 (e.g. the epoch-end save and an exception save): the newer one wins
    older = info("a_step10.ckpt", 10, created=T0)
    newer = info("z_step10_exception.ckpt", 10, created=T0 + dt.timedelta(seconds=1))
    earlier = info("s9.ckpt", 9, created=T0 + dt.timedelta(seconds=5))
    assert KeepLastN(1)([older, newer, earlier]) == {"z_step10_exception.ckpt"}
    assert KeepLastN(1)([newer, older, earlier]) == {"z_step10_exception.ckpt"}
    assert KeepLastN(2)([earlier, newer, older]) == {"z_step10_exception.ckpt", "a_step10.ckpt"}


# -- KeepBestK ------------------------------------------------------------------------------------

@pytest.mark.parametrize("context, k, expected", [
    (MIN, 1, {"c3.ckpt"}),
    (MIN, 2, {"c3.ckpt", "c5.ckpt"}),
    (MAX, 1, {"c2.ckpt"}),
    (MAX, 2, {"c2.ckpt", "c4.ckpt"}),
])
def test_keep_best_k_min_and_max(context, k, expected):
    infos = _series([0.5, 0.9, 0.1, 0.8, 0.2])
    assert KeepBestK(k)(infos, context) == expected


def test_keep_best_k_own_monitor_and_mode_override_the_context():
    infos = [info("a.ckpt", 1, metrics={"loss": 0.1, "acc": 0.2}),
             info("b.ckpt", 2, metrics={"loss": 0.9, "acc": 0.9})]
    assert KeepBestK(1)(infos, MIN) == {"a.ckpt"}
    assert KeepBestK(1, monitor="acc", mode="max")(infos, MIN) == {"b.ckpt"}
    assert KeepBestK(1, monitor="acc")(infos, MAX) == {"b.ckpt"}   # mode from context
    assert KeepBestK(1, mode="max")(infos, MIN) == {"b.ckpt"}      # monitor from context


@pytest.mark.parametrize("context, values", [
    (MIN, [0.5, 0.2, 0.2, 0.2, 0.7]),
    (MAX, [0.5, 0.9, 0.9, 0.9, 0.1]),
])
def test_keep_best_k_ties_keep_the_earlier_checkpoint(context, values):
    infos = _series(values)
    assert KeepBestK(1)(infos, context) == {"c2.ckpt"}
    assert KeepBestK(2)(infos, context) == {"c2.ckpt", "c3.ckpt"}
    assert KeepBestK(1)(list(reversed(infos)), context) == {"c2.ckpt"}


def test_keep_best_k_tie_at_equal_step_keeps_the_earlier_created():
    a = info("a.ckpt", 7, metrics={"loss": 0.3}, created=T0 + dt.timedelta(seconds=9))
    b = info("b.ckpt", 7, metrics={"loss": 0.3}, created=T0)
    assert KeepBestK(1)([a, b], MIN) == {"b.ckpt"}


@pytest.mark.parametrize("context", [MIN, MAX])
def test_nan_and_missing_metrics_are_never_kept_as_best(context):
    infos = [info("nan.ckpt", 1, metrics={"loss": math.nan}),
             info("missing.ckpt", 2, metrics={"other": 0.0}),
             info("none.ckpt", 3, metrics={"loss": None}),
             info("empty.ckpt", 4),
             info("real.ckpt", 5, metrics={"loss": 0.5})]
    assert KeepBestK(1)(infos, context) == {"real.ckpt"}
    # k larger than the scored checkpoints: only the scored ones, never the unscored
    assert KeepBestK(10)(infos, context) == {"real.ckpt"}
    # none scored at all: nothing is "best"
    assert KeepBestK(3)(infos[:4], context) == set()


def test_infinite_metrics_are_ordinary_values():
    infos = _series([0.5, -math.inf, math.inf])
    assert KeepBestK(1)(infos, MIN) == {"c2.ckpt"}
    assert KeepBestK(1)(infos, MAX) == {"c3.ckpt"}


def test_keep_best_k_without_any_monitor_is_a_clear_value_error():
    infos = _series([0.5, 0.2])
    for call in (lambda: KeepBestK(1)(infos), lambda: KeepBestK(1)(infos, RetentionContext()),
                 lambda: KeepBestK(1)([], RetentionContext()),
                 lambda: (KeepLastN(1) | KeepBestK(1))(infos),
                 lambda: KeepBestAndLatest()(infos)):
        with pytest.raises(ValueError, match="KeepBestK needs a metric"):
            call()


# -- KeepBestAndLatest ----------------------------------------------------------------------------

def test_keep_best_and_latest():
    infos = _series([0.5, 0.1, 0.7, 0.9])
    assert KeepBestAndLatest()(infos, MIN) == {"c2.ckpt", "c4.ckpt"}
    assert KeepBestAndLatest()(infos, MAX) == {"c4.ckpt"}            # the latest is also the best
    assert KeepBestAndLatest(monitor="loss", mode="max")(infos, MIN) == {"c4.ckpt"}
    assert KeepBestAndLatest()(_series([None, None]), MIN) == {"c2.ckpt"}  # no scores: latest only
    assert KeepBestAndLatest()([], MIN) == set()


# -- KeepEvery ------------------------------------------------------------------------------------

def test_keep_every_n_steps():
    infos = [info(f"s{s}.ckpt", s, epoch=s // 100) for s in (0, 100, 250, 300, 500, 1000, 1001)]
    assert KeepEvery(n_steps=500)(infos) == {"s0.ckpt", "s500.ckpt", "s1000.ckpt"}
    assert KeepEvery(n_steps=1)(infos) == {i.name for i in infos}


def test_keep_every_n_epochs_ignores_checkpoints_without_an_epoch():
    infos = [info("e2.ckpt", 20, epoch=2), info("e3.ckpt", 30, epoch=3), info("e4.ckpt", 40, epoch=4),
             info("mid.ckpt", 45, epoch=None), info("e6.ckpt", 60, epoch=6)]
    assert KeepEvery(n_epochs=2)(infos) == {"e2.ckpt", "e4.ckpt", "e6.ckpt"}
    assert KeepEvery(n_epochs=3)(infos) == {"e3.ckpt", "e6.ckpt"}


# -- custom callables ----------------------------------------------------------------------------

def test_custom_callable_is_a_policy():
    def keep_odd_steps(infos):
        return {i.name for i in infos if i.step % 2}

    infos = _series([1.0] * 5)
    policy = as_policy(keep_odd_steps)
    assert isinstance(policy, Custom)
    assert policy(infos) == {"c1.ckpt", "c3.ckpt", "c5.ckpt"}
    # a list / tuple / frozenset of names is accepted too
    for kind in (list, tuple, frozenset):
        assert as_policy(lambda infos, kind=kind: kind(["c2.ckpt"]))(infos) == {"c2.ckpt"}
    assert as_policy(lambda infos: set())(infos) == set()


def test_custom_callable_receives_a_list_copy():
    seen = []

    def spy(infos):
        seen.append(infos)
        infos.clear()  # mutating its argument must not affect anything else
        return set()

    infos = _series([1.0, 2.0])
    (as_policy(spy) | KeepLastN(1))(infos)
    assert isinstance(seen[0], list) and len(infos) == 2


def test_custom_callable_returning_unknown_names_is_refused():
    infos = _series([1.0, 2.0])
    with pytest.raises(ValueError, match=r"unknown names \['ghost.ckpt'\]"):
        as_policy(lambda infos: {"c1.ckpt", "ghost.ckpt"})(infos)


@pytest.mark.parametrize("returned", [None, "c1.ckpt", {"c1.ckpt": True}, 3, (n for n in ["c1.ckpt"])])
def test_custom_callable_returning_the_wrong_type_is_refused(returned):
    with pytest.raises(TypeError, match="must return a set of names"):
        as_policy(lambda infos: returned)(_series([1.0]))


def test_as_policy_refuses_what_is_neither_policy_nor_callable():
    with pytest.raises(TypeError, match="retention must be a policy or a callable"):
        as_policy(3)
    with pytest.raises(TypeError):
        KeepLastN(1) | "c1.ckpt"


# -- composition ----------------------------------------------------------------------------------

def test_union_of_policies():
    infos = _series([0.5, 0.1, 0.7, 0.9, 0.8, 0.6])
    policy = KeepLastN(2) | KeepBestK(1) | KeepEvery(n_steps=3)
    assert isinstance(policy, AnyOf) and len(policy.policies) == 3  # flat, not nested
    assert policy(infos, MIN) == {"c5.ckpt", "c6.ckpt", "c2.ckpt", "c3.ckpt"}


def test_callable_or_policy_and_policy_or_callable():
    infos = _series([0.5, 0.1, 0.7, 0.9])

    def first(infos):
        return {min(infos, key=lambda i: i.step).name}

    left = first | KeepLastN(1)                  # function.__or__ does not exist: __ror__
    right = KeepLastN(1) | first
    lam = (lambda infos: {"c2.ckpt"}) | KeepLastN(1)
    assert isinstance(left, RetentionPolicy) and isinstance(right, RetentionPolicy)
    assert left(infos) == right(infos) == {"c1.ckpt", "c4.ckpt"}
    assert lam(infos) == {"c2.ckpt", "c4.ckpt"}
    assert (first | (KeepLastN(1) | KeepBestK(1)))(infos, MIN) == {"c1.ckpt", "c2.ckpt", "c4.ckpt"}
    assert ((KeepLastN(1) | KeepBestK(1)) | first)(infos, MIN) == {"c1.ckpt", "c2.ckpt", "c4.ckpt"}


def test_union_propagates_a_member_error():
    with pytest.raises(ValueError, match="unknown names"):
        (KeepLastN(1) | (lambda infos: {"nope.ckpt"}))(_series([1.0]))


# -- validation -----------------------------------------------------------------------------------

@pytest.mark.parametrize("make, match", [
    (lambda: KeepLastN(0), "KeepLastN needs n >= 1"),
    (lambda: KeepLastN(-3), "KeepLastN needs n >= 1"),
    (lambda: KeepBestK(0), "KeepBestK needs k >= 1"),
    (lambda: KeepBestK(-1), "KeepBestK needs k >= 1"),
    (lambda: KeepBestK(1, mode="median"), "mode must be 'min' or 'max'"),
    (lambda: KeepEvery(), "exactly one of n_steps= or n_epochs="),
    (lambda: KeepEvery(n_steps=2, n_epochs=2), "exactly one of n_steps= or n_epochs="),
    (lambda: KeepEvery(n_steps=0), "interval must be >= 1"),
    (lambda: KeepEvery(n_epochs=-2), "interval must be >= 1"),
])
def test_validation_errors(make, match):
    with pytest.raises(ValueError, match=match):
        make()


# -- properties ------------------------------------------------------------------------------------

_values = st.one_of(st.none(), st.just(math.nan), st.floats(-10, 10, allow_nan=False))


@st.composite
def _infos(draw):
    steps = draw(st.lists(st.integers(0, 60), max_size=25))
    out = []
    for index, step in enumerate(steps):
        value = draw(_values)
        epoch = draw(st.one_of(st.none(), st.integers(0, 20)))
        out.append(info(f"n{index}.ckpt", step, epoch=epoch,
                        metrics={} if value is None else {"loss": value},
                        created=T0 + dt.timedelta(seconds=draw(st.integers(0, 5)))))
    return out


_policies = st.one_of(
    st.builds(KeepLastN, st.integers(1, 8)),
    st.builds(KeepBestK, st.integers(1, 8)),
    st.builds(lambda n: KeepEvery(n_steps=n), st.integers(1, 10)),
    st.builds(lambda n: KeepEvery(n_epochs=n), st.integers(1, 5)),
    st.just(KeepBestAndLatest()),
    st.just(KeepAll()),
)


@settings(max_examples=150, deadline=None)
@given(_infos(), st.lists(_policies, min_size=1, max_size=4), st.sampled_from([MIN, MAX]))
def test_union_keeps_exactly_the_union(infos, policies, context):
    union = policies[0]
    for policy in policies[1:]:
        union = union | policy
    expected = set().union(*(p(infos, context) for p in policies))
    assert union(infos, context) == expected
    assert expected <= {i.name for i in infos}


@settings(max_examples=150, deadline=None)
@given(_infos(), st.integers(1, 30))
def test_keep_last_n_keeps_min_n_len_names(infos, n):
    kept = KeepLastN(n)(infos)
    assert len(kept) == min(n, len(infos))
    if kept and len(kept) < len(infos):  # every kept one is at least as new as every dropped one
        key = {i.name: (i.step, i.created) for i in infos}
        assert min(key[k] for k in kept) >= max(key[i.name] for i in infos if i.name not in kept)


@settings(max_examples=150, deadline=None)
@given(_infos(), st.integers(1, 8), st.sampled_from([MIN, MAX]))
def test_keep_best_k_keeps_only_scored_and_the_best_of_them(infos, k, context):
    kept = KeepBestK(k)(infos, context)
    scored = [i for i in infos if i.metrics.get("loss") is not None and not math.isnan(i.metrics["loss"])]
    assert len(kept) == min(k, len(scored))
    assert kept <= {i.name for i in scored}
    sign = 1 if context.mode == "min" else -1
    if kept and len(kept) < len(scored):
        worst_kept = max(sign * i.metrics["loss"] for i in scored if i.name in kept)
        best_dropped = min(sign * i.metrics["loss"] for i in scored if i.name not in kept)
        assert worst_kept <= best_dropped
