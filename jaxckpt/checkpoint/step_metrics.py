"""The metrics each saved step is ranked by, and the steps a manager's retention keeps.

A step's metrics are those saved with it (Orbax's `metrics/metrics` item, read once and cached)
merged with late ones (`LateMetrics`, e.g. a follower evaluator's results); saved metrics win
where both name the same metric. What is kept is the `RetentionPolicy` over those, plus steps still
awaiting the best metric while more are coming, plus steps a reader pins (`jaxckpt.checkpoint.pins`).
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping, Protocol, Sequence

import jax

from jaxckpt.checkpoint import pins, storage
from jaxckpt.checkpoint.retention import RetentionPolicy
from jaxckpt.checkpoint.stepdir import read_json_item


class LateMetrics(Protocol):
    """Metrics that arrive after a step was saved, e.g. from a follower evaluator in another process."""

    def metrics(self, step: int) -> Mapping[str, Any] | None:
        """The late metrics of `step` (e.g. `{"val/loss": 0.3}`), or None if none arrived yet."""

    def waiting(self) -> bool:
        """Whether metrics are still coming for steps that lack them (a live evaluator is attached)."""


class StepMetrics:
    """The saved and late metrics of the steps in one directory, and the retention decision over them."""

    def __init__(self, directory: storage.AnyPath, policy: RetentionPolicy, late: LateMetrics | None):
        self._directory = directory
        self._policy = policy
        self._late = late
        self._saved: dict[int, dict[str, Any] | None] = {}

    def record(self, step: int, metrics: dict[str, Any] | None) -> None:
        """Notes the metrics a step is being saved with (so they are not read back from disk)."""
        self._saved[step] = metrics

    def forget(self, step: int | None = None) -> None:
        """Drops what is known of `step` (None: of every step), e.g. once it is deleted or moved."""
        if step is None:
            self._saved.clear()
        else:
            self._saved.pop(step, None)

    def saved(self, step: int) -> dict[str, Any] | None:
        """The metrics `step` was saved with, if known (None: none, or not read yet)."""
        return self._saved.get(step)

    def by_step(self, steps: Iterable[int]) -> dict[int, dict[str, Any] | None]:
        """`{step: saved and late metrics}` of `steps`, reading those not known yet from disk."""
        steps = list(steps)
        for step in steps:
            if step not in self._saved:
                self._saved[step] = read_json_item(self._directory / str(int(step)), "metrics")
        return {step: self._with_late(step, self._saved[step]) for step in steps}

    def _with_late(self, step: int, saved: Mapping[str, Any] | None) -> dict[str, Any] | None:
        late = self._late.metrics(step) if self._late is not None else None
        return {**late, **(saved or {})} if late else saved

    def steps_to_keep(self, saved: Mapping[int, Mapping[str, Any] | None]) -> set[int]:
        """The retention decision: the policy over saved and late metrics, steps awaiting a metric, pins."""
        metrics = {step: self._with_late(step, m) for step, m in saved.items()}
        keep = self._policy.steps_to_keep(metrics)
        name = self._policy.best_metric
        if name and self._policy.keep_best and self._late is not None and self._late.waiting():
            keep |= {step for step, m in metrics.items() if name not in (m or {})}
        return pins.guard(self._directory, metrics, keep, mark=jax.process_index() == 0)

    def preservation_policy(self) -> "_PinnedPolicy":
        """This decision as an Orbax preservation policy (Orbax applies it after each save commits)."""
        return _PinnedPolicy(self)


class _PinnedPolicy:
    """The Orbax preservation policy of a manager: its retention, late metrics and pins together."""

    def __init__(self, metrics: StepMetrics):
        self._metrics = metrics

    def should_preserve(self, checkpoints: Sequence[Any], *, context: Any = None) -> list[bool]:
        del context
        keep = self._metrics.steps_to_keep({info.step: info.metrics for info in checkpoints})
        return [info.step in keep for info in checkpoints]
