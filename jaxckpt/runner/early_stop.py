"""Early stopping: which validation metric ranks evaluations, when a run stops, and that it stays stopped.

The bookkeeping is a plain dict saved in every checkpoint's `extra["loop_state"]`:
`best_value`, `best_step`, `bad_evals` (evaluations since the last strict improvement) and, once
the run stopped early, `stopped_early_at`. "Best" is the first step that reached the best value,
as `RetentionPolicy` ranks checkpoints.
"""

from __future__ import annotations

import math
from typing import Any

import jax

from jaxckpt.errors import UserError
from jaxckpt.runner.logs import log
from jaxckpt.runner.task import Task, has_model_state
from jaxckpt.train.state import TrainState
from jaxckpt.train.step import COUNT, make_eval_step


def check_criteria(criteria: str, task: Task, abstract: TrainState, batch_size: int) -> None:
    """Refuses an `early_stop.criteria` the evaluation will not return, before any step is trained.

    The metric names come from tracing the eval step on one val batch (nothing is computed).
    `num_examples` is the example count, not a metric, so it is not offered.
    """
    if not criteria:
        return
    batch = {k: v for k, v in next(iter(task.eval_batches("val", batch_size))).items() if k != "id"}
    eval_step = make_eval_step(task.metrics_fn, model_state=has_model_state(task))
    names = [k for k in jax.eval_shape(eval_step, abstract, batch) if k != COUNT]
    summarize = getattr(task, "summarize", None)
    if callable(summarize):  # derived metrics (e.g. perplexity) are computed from the means
        names = list(summarize({name: 1.0 for name in names}))
    names = sorted(set(names) - {"num_examples"})
    if criteria not in [f"val/{name}" for name in names]:
        raise UserError(
            f"early_stop.criteria={criteria!r} is not a validation metric of this task; use one of "
            f"{', '.join('val/' + name for name in names)}, or '' to rank no checkpoint best and never stop early.")


def update(loop_state: dict[str, Any], val_metrics: dict[str, float], criteria: str,
                       minimize: bool, step: int) -> bool:
    """Updates best value / bad-eval count in place; returns whether this evaluation is a new best."""
    if not criteria:
        return False
    split, _, name = criteria.partition("/")
    if split != "val" or name not in val_metrics or name == "num_examples":
        raise ValueError(
            f"early_stop.criteria={criteria!r} is not a validation metric; use one of "
            f"{', '.join('val/' + k for k in val_metrics if k != 'num_examples')}.")
    value = val_metrics[name]
    best = loop_state["best_value"]
    better = math.isfinite(value) and (best is None or (value < best if minimize else value > best))
    if better:
        loop_state.update(best_value=value, best_step=step, bad_evals=0)
    else:
        loop_state["bad_evals"] += 1
    return better


def already_stopped(config: Any, loop_state: dict[str, Any]) -> bool:
    """Whether the resumed run stopped early and still would under this config (then says so).

    Early stopping is final: rerunning the command must not train one more step and stop again.
    With a larger `early_stop.patience` (or -1) the run goes on from where it stopped.
    """
    stopped = loop_state.pop("stopped_early_at", None)
    patience = config.early_stop.patience
    if stopped is None or patience < 0 or loop_state["bad_evals"] <= patience:
        return False
    log.info("the run already stopped early at step %d (%s did not improve for %d evaluations; best %.6g at "
             "step %s): nothing to train. To train on, raise early_stop.patience (-1 turns early stopping off) "
             "or pass a new --workdir.", stopped, config.early_stop.criteria, loop_state["bad_evals"],
             loop_state["best_value"], loop_state["best_step"])
    return True
