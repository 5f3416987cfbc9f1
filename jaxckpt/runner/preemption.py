"""Graceful preemption: SIGTERM/SIGINT finish the current step, then the loop saves and exits."""

from __future__ import annotations

import signal
import threading
from typing import Any


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
