"""Tests for jaxckpt.checkpoint.retention.RetentionPolicy: which steps survive, with no checkpoint on disk."""

import math
from types import SimpleNamespace

import pytest

from jaxckpt.checkpoint.retention import RetentionPolicy

NAN, INF = math.nan, math.inf


def _metrics(values):
    """`{step: value}` -> `{step: {"m": value}}`; a value of None means the step saved no metrics."""
    return {step: None if v is None else {"m": v} for step, v in values.items()}


@pytest.mark.parametrize("max_to_keep", [-1, None])
def test_max_to_keep_minus_one_or_none_keeps_every_step(max_to_keep):
    policy = RetentionPolicy(max_to_keep=max_to_keep, keep_best=0)
    assert policy.steps_to_keep({s: None for s in (3, 1, 7, 5)}) == {1, 3, 5, 7}


def test_max_to_keep_keeps_the_newest_by_step_not_by_insertion_order():
    policy = RetentionPolicy(max_to_keep=2, keep_best=0)
    assert policy.steps_to_keep({30: None, 10: None, 20: None}) == {20, 30}


@pytest.mark.parametrize("mode, best_two", [("min", [2, 4]), ("max", [3, 1])])
def test_best_k_by_mode(mode, best_two):
    policy = RetentionPolicy(max_to_keep=1, keep_best=2, best_metric="m", best_mode=mode)
    metrics = _metrics({1: 0.5, 2: 0.1, 3: 0.9, 4: 0.3, 5: 0.4})
    assert policy.ranked_best(metrics)[:2] == best_two
    assert policy.steps_to_keep(metrics) == {5, *best_two}  # the latest plus the best two


@pytest.mark.parametrize("mode, values, ranked", [
    ("min", {1: 0.5, 2: 0.2, 3: 0.2, 4: 0.2}, [2, 3, 4, 1]),
    ("max", {1: 0.5, 2: 0.9, 3: 0.5, 4: 0.9}, [2, 4, 1, 3]),
])
def test_ties_go_to_the_earlier_step_as_early_stopping_counts_them(mode, values, ranked):
    # Early stopping counts only strict improvements, so its best is the first step to reach a value.
    policy = RetentionPolicy(max_to_keep=1, keep_best=1, best_metric="m", best_mode=mode)
    assert policy.ranked_best(_metrics(values)) == ranked
    assert policy.steps_to_keep(_metrics(values)) == {ranked[0], 4}


@pytest.mark.parametrize("mode", ["min", "max"])
def test_nan_inf_and_missing_metrics_are_never_best(mode):
    policy = RetentionPolicy(max_to_keep=1, keep_best=1, best_metric="m", best_mode=mode)
    # Under "min", -inf would win as a number; under "max", +inf would.
    metrics = {1: {"m": NAN}, 2: {"m": -INF}, 3: {"m": INF}, 4: {"m": 0.7}, 5: None, 6: {},
               7: {"other": 0.0}, 8: {"m": "not a number"}, 9: {"m": NAN}}
    assert policy.ranked_best(metrics) == [4]
    assert policy.steps_to_keep(metrics) == {4, 9}
    assert [policy.score(metrics[s]) for s in (1, 2, 3, 5, 6, 7, 8)] == [None] * 7


def test_no_finite_metric_keeps_only_the_latest():
    policy = RetentionPolicy(max_to_keep=1, keep_best=3, best_metric="m")
    assert policy.steps_to_keep(_metrics({1: NAN, 2: None, 3: INF})) == {3}


def test_without_best_metric_the_best_rule_keeps_nothing():
    policy = RetentionPolicy(max_to_keep=1, keep_best=5, best_metric=None)
    metrics = _metrics({1: 0.1, 2: 0.2})
    assert policy.ranked_best(metrics) == [] and policy.steps_to_keep(metrics) == {2}


def test_keep_every_steps_keeps_multiples_beside_the_other_rules():
    policy = RetentionPolicy(max_to_keep=1, keep_best=1, best_metric="m", keep_every_steps=4)
    metrics = _metrics({s: 1.0 for s in range(1, 11)} | {3: 0.1})
    assert policy.steps_to_keep(metrics) == {3, 4, 8, 10}


def test_latest_is_kept_even_when_it_is_the_worst():
    policy = RetentionPolicy(max_to_keep=1, keep_best=1, best_metric="m", best_mode="max")
    assert policy.steps_to_keep(_metrics({1: 0.9, 2: 0.1, 3: NAN})) == {1, 3}


def test_orbax_should_preserve_flags_each_checkpoint_in_order():
    policy = RetentionPolicy(max_to_keep=1, keep_best=1, best_metric="loss")
    infos = [SimpleNamespace(step=s, metrics={"loss": v}) for s, v in ((1, 0.1), (2, 0.5), (3, 0.9))]
    assert policy.should_preserve(infos) == [True, False, True]


@pytest.mark.parametrize("kwargs, message", [
    ({"max_to_keep": 0}, "max_to_keep=0 would delete the latest checkpoint"),
    ({"max_to_keep": -2}, "max_to_keep=-2 would delete the latest checkpoint"),
    ({"keep_best": -1}, r"keep_best=-1 must be >= 0"),
    ({"best_mode": "lowest"}, r"best_mode='lowest' must be 'min'"),
    ({"keep_every_steps": 0}, "keep_every_steps=0 must be a positive number"),
])
def test_invalid_settings_name_the_field(kwargs, message):
    with pytest.raises(ValueError, match=message):
        RetentionPolicy(**kwargs)
