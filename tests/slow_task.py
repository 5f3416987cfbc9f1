"""The digits task, slowed down on purpose, for tests of what happens while time passes.

`config.task = "tests.slow_task"`. Environment variables (read at each batch, so a test sets them
per process): `SLOW_TRAIN_SECONDS` sleeps before every training batch, `SLOW_EVAL_SECONDS` before
every evaluation batch. Checkpoints and metrics are the digits task's own.
"""

from __future__ import annotations

import os
import time
from typing import Any, Mapping

from experiments.tasks import digits


def _pause(name: str) -> None:
    seconds = float(os.environ.get(name, "0") or 0)
    if seconds:
        time.sleep(seconds)


class _SlowIterator:
    def __init__(self, inner: Any):
        self._inner = inner

    def __iter__(self):
        return self

    def __next__(self):
        _pause("SLOW_TRAIN_SECONDS")
        return next(self._inner)

    def get_state(self):
        return self._inner.get_state()

    def set_state(self, state):
        self._inner.set_state(state)


class _SlowTask:
    def __init__(self, inner: Any):
        self._inner = inner

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def train_iterator(self, batch_size: int, seed: int) -> Any:
        return _SlowIterator(self._inner.train_iterator(batch_size, seed))

    def eval_batches(self, split: str, batch_size: int):
        for batch in self._inner.eval_batches(split, batch_size):
            _pause("SLOW_EVAL_SECONDS")
            yield batch


def build(config: Any, artifacts: Mapping[str, Any] | None = None) -> _SlowTask:
    """The digits task with pauses (see the module docstring)."""
    return _SlowTask(digits.build(config, artifacts))
