"""Time-based saves: save once `checkpoint.every_seconds` of wall time passed since the last save.

This is Orbax's continuous-checkpointing idea (save by time, not only by step count) made safe for
several processes: every process must save the same step, but their clocks differ. So:

* One process: the host clock is read after every step (a `time.monotonic()` call, no device sync).
* Several processes: only every `check_every_steps` steps (the loop passes `train.log_every_steps`,
  where it already waits for the device to log), process 0's elapsed time is broadcast with
  `jax.experimental.multihost_utils.broadcast_one_to_all` and every process decides on that value.
  Every process calls the broadcast at the same steps, so they agree without any other exchange;
  a time-based save then lands at most `check_every_steps - 1` steps late.

Any save resets the clock (`saved()`), the step-count ones included: the interval is "since the
last save", whatever caused it. The clock starts after the run's first step, whose time is mostly
compilation (no work a save would protect). Retention treats the steps saved this way like any other.

Example:
  >>> clock = SaveClock(every_seconds=600, check_every_steps=20)
  >>> clock.due(1)  # the first step starts the clock
  False
"""

from __future__ import annotations

import time
from typing import Callable

import jax
import numpy as np


class SaveClock:
    """Says, step by step, whether a time-based save is due, identically on every process."""

    def __init__(self, every_seconds: float, check_every_steps: int, *,
                 clock: Callable[[], float] = time.monotonic):
        """A clock that starts at the first `due` call (after the run's first step).

        Args:
          every_seconds: the wall time between saves; 0 turns time-based saves off.
          check_every_steps: with several processes, how often (in steps) to agree on the time.
          clock: seconds as a float (tests pass a fake one).

        Raises:
          ValueError: for a negative `every_seconds` or a `check_every_steps` below 1.
        """
        if every_seconds < 0:
            raise ValueError(f"checkpoint.every_seconds={every_seconds} must be >= 0 (0 turns time-based saves off).")
        if check_every_steps < 1:
            raise ValueError(f"check_every_steps={check_every_steps} must be >= 1.")
        self.every_seconds = float(every_seconds)
        self.check_every_steps = int(check_every_steps)
        self._clock = clock
        self._last: float | None = None

    def elapsed(self) -> float:
        """Seconds since the last save (or since the clock started) on this process's clock."""
        return 0.0 if self._last is None else self._clock() - self._last

    def due(self, step: int) -> bool:
        """Whether to save at `step` because of time; call it once per step on every process.

        Args:
          step: the step just taken.

        Returns:
          True when `every_seconds` passed since the last save (process 0's clock with several
          processes, checked every `check_every_steps` steps); False at the first call, which
          starts the clock.
        """
        if not self.every_seconds:
            return False
        if self._last is None:  # on every process at the same (first) step
            self._last = self._clock()
            return False
        if jax.process_count() == 1:
            return self.elapsed() >= self.every_seconds
        if step % self.check_every_steps:
            return False
        from jax.experimental import multihost_utils

        elapsed = multihost_utils.broadcast_one_to_all(np.float64(self.elapsed()))
        return float(elapsed) >= self.every_seconds

    def saved(self) -> None:
        """Restarts the interval: call it after every save, whatever caused it."""
        self._last = self._clock()
