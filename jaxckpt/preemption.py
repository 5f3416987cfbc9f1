"""Graceful preemption: SIGTERM/SIGINT finish the current step, then the loop saves and exits."""

from __future__ import annotations

import signal
import threading
from typing import Any

PREEMPTED_EXIT_CODE = 75
"""Exit code of a run stopped by SIGTERM/SIGINT after saving (EX_TEMPFAIL: rerun to continue)."""


class Preempted(Exception):
    """Raised by the loop after it saved and committed a checkpoint because a signal asked it to stop."""

    def __init__(self, step: int, signum: int):
        self.step = step
        self.signum = signum
        super().__init__(
            f"stopped by {signal.Signals(signum).name} after saving step {step}; rerun the same "
            f"command to continue (exit code {PREEMPTED_EXIT_CODE}).")


class StopRequest:
    """Records SIGTERM/SIGINT instead of dying mid-step; restores the old handlers on exit.

    A second SIGINT while the first is being handled raises `KeyboardInterrupt` as usual, so a
    user can still force an exit.
    """

    def __init__(self, signals: tuple[int, ...] = (signal.SIGTERM, signal.SIGINT)):
        self._signals = signals
        self._old: dict[int, Any] = {}
        self.signum: int | None = None

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def __enter__(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread():
            for s in self._signals:
                self._old[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for s, old in self._old.items():
            signal.signal(s, old)
        self._old.clear()
