"""Which checkpoints to keep: the latest N, the best k by a metric, and every N-th step.

One policy, three rules, united: a step survives if any rule keeps it. The latest step is always
kept, whatever its metric, and a step with a missing, NaN or infinite metric is never "best".

`RetentionPolicy` is also an Orbax `PreservationPolicy` (it has `should_preserve`), so Orbax's own
`CheckpointManager` applies it after each save has been committed. We write our own rather than
combine Orbax's `LatestN`/`BestN`/`EveryNSteps` because `BestN` ranks NaN metrics like numbers and
keeps every checkpoint while there are fewer than k of them, so "best" would not mean one thing in
`best_step()` and in what is kept on disk.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Mapping, Sequence

import numpy as np

_MODES = ("min", "max")


@dataclasses.dataclass(frozen=True)
class RetentionPolicy:
    """Keep the latest `max_to_keep`, plus the best `keep_best`, plus every `keep_every_steps`.

    Attributes:
      max_to_keep: how many of the most recent steps to keep; -1 or None keeps all.
      keep_best: how many of the best steps (by `metrics[best_metric]`) to keep in addition.
      best_metric: the metric that ranks steps; None disables the best rule.
      best_mode: "min" if lower is better (a loss), "max" if higher is better (an accuracy).
      keep_every_steps: also keep every step divisible by this; None disables the rule.

    Example:
      >>> policy = RetentionPolicy(max_to_keep=1, keep_best=1, best_metric="loss")
      >>> sorted(policy.steps_to_keep({1: {"loss": 0.5}, 2: {"loss": 0.1}, 3: {"loss": 0.9}}))
      [2, 3]
    """

    max_to_keep: int | None = 3
    keep_best: int = 1
    best_metric: str | None = None
    best_mode: str = "min"
    keep_every_steps: int | None = None

    def __post_init__(self):
        if self.max_to_keep is not None and self.max_to_keep != -1 and self.max_to_keep < 1:
            raise ValueError(
                f"max_to_keep={self.max_to_keep} would delete the latest checkpoint; use a positive "
                "number, or -1 (or None) to keep every checkpoint."
            )
        if self.keep_best < 0:
            raise ValueError(f"keep_best={self.keep_best} must be >= 0 (0 disables the best rule).")
        if self.best_mode not in _MODES:
            raise ValueError(f"best_mode={self.best_mode!r} must be 'min' (lower is better) or 'max'.")
        if self.keep_every_steps is not None and self.keep_every_steps < 1:
            raise ValueError(f"keep_every_steps={self.keep_every_steps} must be a positive number of steps or None.")

    def score(self, metrics: Mapping[str, Any] | None) -> float | None:
        """The ranking value of one step's metrics (higher is better), or None if it cannot be best.

        Args:
          metrics: the metrics saved with the step, or None.

        Returns:
          `metrics[best_metric]` (negated in "min" mode), or None when there is no best metric, the
          step has no such metric, or its value is NaN or infinite.
        """
        if self.best_metric is None or not metrics or self.best_metric not in metrics:
            return None
        try:
            value = float(metrics[self.best_metric])
        except (TypeError, ValueError):
            return None
        if not math.isfinite(value):
            return None
        return -value if self.best_mode == "min" else value

    def ranked_best(self, metrics_by_step: Mapping[int, Mapping[str, Any] | None]) -> list[int]:
        """Steps that can be best, best first; ties go to the earlier step.

        "Best" means the first step that reached the best value, as early stopping counts it: a
        later step with an equal value is no improvement, so it ranks after the earlier one.

        Args:
          metrics_by_step: each saved step mapped to its metrics (or None).

        Returns:
          The steps with a finite `best_metric`, ordered from best to worst.
        """
        scored = [(-s, step) for step, m in metrics_by_step.items() if (s := self.score(m)) is not None]
        return [step for _, step in sorted(scored)]

    def steps_to_keep(self, metrics_by_step: Mapping[int, Mapping[str, Any] | None]) -> set[int]:
        """The steps the policy keeps.

        Args:
          metrics_by_step: each saved step mapped to its metrics (or None).

        Returns:
          The set of steps to keep; every other step may be deleted.
        """
        steps = sorted(metrics_by_step)
        if self.max_to_keep is None or self.max_to_keep == -1:
            keep = set(steps)
        else:
            keep = set(steps[-self.max_to_keep :])
        keep.update(self.ranked_best(metrics_by_step)[: self.keep_best])
        if self.keep_every_steps:
            keep.update(step for step in steps if step % self.keep_every_steps == 0)
        return keep

    def should_preserve(self, checkpoints: Sequence[Any], *, context: Any = None) -> list[bool]:
        """Orbax `PreservationPolicy` hook: one flag per checkpoint info (`.step`, `.metrics`).

        Args:
          checkpoints: Orbax checkpoint infos, oldest first.
          context: Orbax's preservation context (unused).

        Returns:
          True for each checkpoint to keep.
        """
        del context
        keep = self.steps_to_keep({info.step: info.metrics for info in checkpoints})
        return [info.step in keep for info in checkpoints]

    def pick(
        self,
        step: int | str | None,
        steps: Sequence[int],
        metrics_by_step: Callable[[], Mapping[int, Mapping[str, Any] | None]],
        where: str,
        note: str = "",
    ) -> int:
        """The saved step that `step` names, or an error saying why there is none.

        Args:
          step: "latest" or None (the newest step), "best" (by `best_metric`), or a step number.
          steps: the saved steps, oldest first.
          metrics_by_step: returns each saved step's metrics; called only for "best".
          where: the directory holding the steps, for the messages.
          note: appended to "not found" messages (e.g. where corrupt steps went).

        Returns:
          The step.

        Raises:
          CheckpointNotFoundError: no step, no such step, or no step with a finite best metric.
          ValueError: "best" without a `best_metric`, or `step` of another type.
        """
        from jaxckpt.errors import CheckpointNotFoundError

        if step is None or step == "latest":
            if not steps:
                raise CheckpointNotFoundError(
                    f"No checkpoint in {where}: it holds no step directories{note}. Save one first, or "
                    "point to the directory that holds the <step>/ folders.")
            return steps[-1]
        if step == "best":
            if self.best_metric is None:
                raise ValueError(
                    f"step='best' needs a metric to rank by, but best_metric=None for {where}. Pass "
                    "best_metric='<name>' (and best_mode), or use step='latest'.")
            ranked = self.ranked_best(metrics_by_step())
            if not ranked:
                raise CheckpointNotFoundError(
                    f"No step in {where} has a finite metrics[{self.best_metric!r}] (saved steps: "
                    f"{list(steps)}{note}). Save with metrics={{{self.best_metric!r}: value}}, or use "
                    "step='latest'.")
            return ranked[0]
        if isinstance(step, (int, np.integer)) and not isinstance(step, bool):
            if int(step) not in steps:
                raise CheckpointNotFoundError(f"Step {int(step)} is not in {where}; saved steps: {list(steps)}{note}.")
            return int(step)
        raise ValueError(f"step must be 'latest', 'best' or an int, got {step!r}.")
