"""A follower evaluator's results, as late metrics that rank a run's steps (see `jaxckpt.runner.follow`).

Kept apart from the follower itself so the trainer's manager (`jaxckpt.runner.setup`) reads them
without importing the evaluation machinery.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from jaxckpt.checkpoint import pins, storage
from jaxckpt.runner.rundir import run_file

_RESERVED = ("step", "split")


def result_path(workdir: str | Path, split: str, step: int) -> storage.AnyPath:
    """`WORKDIR/eval_<split>_<step>.json` (an `epath.Path` for a `gs://` / `s3://` workdir)."""
    return run_file(workdir) / f"eval_{split}_{step}.json"


class FollowerResults:
    """A follower's results as late metrics for a `CheckpointManager` (see `LateMetrics`).

    `metrics(step)` is `{"<split>/<name>": value}` from `eval_<split>_<step>.json`; `waiting()` is
    whether a live follower for `split` is attached to the run's checkpoints.
    """

    def __init__(self, workdir: str | Path, split: str):
        self._workdir = run_file(workdir)
        self._split = split
        self._found: dict[int, dict[str, float]] = {}  # a result, once written, never changes

    def metrics(self, step: int) -> dict[str, float] | None:
        if step in self._found:
            return self._found[step]
        try:
            result = json.loads(result_path(self._workdir, self._split, step).read_text())
        except (OSError, ValueError):
            return None
        self._found[step] = {f"{self._split}/{k}": float("nan") if v is None else v for k, v in result.items()
                             if k not in _RESERVED and isinstance(v, (int, float, type(None)))}
        return self._found[step]

    def waiting(self) -> bool:
        return pins.attached(self._workdir / "checkpoints", self._split)


def follower_results(config: Any, workdir: str | Path) -> FollowerResults | None:
    """The follower results that rank this run's steps: those of `early_stop.criteria`'s split."""
    split, _, name = (config.early_stop.criteria or "").partition("/")
    return FollowerResults(workdir, split) if name else None
