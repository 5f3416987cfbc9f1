"""Tests for jaxckpt.early_stop: strict improvement, NaN never best, staying stopped."""

import math

import pytest
from ml_collections import ConfigDict

from jaxckpt.runner import early_stop


def _fresh():
    return {"best_value": None, "best_step": None, "bad_evals": 0}


@pytest.mark.parametrize("minimize, values, improved, best_step, bad", [
    (True, [0.5, 0.4, 0.4, 0.6], [True, True, False, False], 2, 2),  # a tie is not an improvement
    (False, [0.5, 0.7, 0.7, 0.6], [True, True, False, False], 2, 2),
    (True, [math.nan, 0.9, math.inf, 0.8], [False, True, False, True], 4, 0),  # NaN, inf never best
])
def test_update_counts_only_strict_improvements(minimize, values, improved, best_step, bad):
    state = _fresh()
    got = [early_stop.update(state, {"loss": v}, "val/loss", minimize, step) for step, v in enumerate(values, 1)]
    assert got == improved
    assert state["best_step"] == best_step and state["bad_evals"] == bad


def test_update_without_criteria_never_improves():
    state = _fresh()
    assert early_stop.update(state, {"loss": 0.1}, "", True, 1) is False
    assert state == _fresh()


def test_update_rejects_a_criteria_the_metrics_lack():
    with pytest.raises(ValueError, match=r"val/acc.*use one of val/loss"):
        early_stop.update(_fresh(), {"loss": 0.1, "num_examples": 8}, "val/acc", True, 1)


@pytest.mark.parametrize("patience, stays", [(1, True), (3, False), (-1, False)])
def test_a_run_that_stopped_early_stays_stopped_unless_patience_allows_more(patience, stays):
    config = ConfigDict({"early_stop": {"patience": patience, "criteria": "val/loss"}})
    state = {"best_value": 0.3, "best_step": 100, "bad_evals": 2, "stopped_early_at": 300}
    assert early_stop.already_stopped(config, state) is stays
    assert "stopped_early_at" not in state  # a run that trains on records a new stop, if any
