"""Time-based saves: `checkpoint.every_seconds`, decided alike on every process."""

import re

import numpy as np
import pytest

from jaxckpt.runner import save_clock
from jaxckpt.runner.save_clock import SaveClock
from tests.runs import run_cli, tiny_flags


class _FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def test_one_process_saves_once_the_interval_passed_and_any_save_restarts_it():
    clock = _FakeClock()
    saves = SaveClock(10.0, 5, clock=clock)
    clock.now = 100.0  # the first step (compiling) took long: it starts the clock, it saves nothing
    assert not saves.due(1)
    clock.now = 109.9
    assert not saves.due(2)
    clock.now = 110.0
    assert saves.due(2)
    saves.saved()
    clock.now = 115.0
    assert not saves.due(3)
    assert not SaveClock(0.0, 5, clock=clock).due(1)  # off


def test_several_processes_decide_on_process_zeros_clock_every_check_steps(monkeypatch):
    clock, calls = _FakeClock(), []
    monkeypatch.setattr(save_clock.jax, "process_count", lambda: 2)

    def broadcast(value):  # what process 0 sent: here its clock is ahead of ours
        calls.append(float(value))
        return np.float64(100.0)

    from jax.experimental import multihost_utils
    monkeypatch.setattr(multihost_utils, "broadcast_one_to_all", broadcast)
    saves = SaveClock(10.0, 5, clock=clock)
    assert [saves.due(step) for step in range(1, 11)] == [False] * 4 + [True] + [False] * 4 + [True]
    # (the first call started the clock; the broadcast, not this process's clock, decided the rest)
    assert calls == [0.0, 0.0]  # one broadcast per check step, none in between: no per-step sync


def test_negative_interval_is_refused():
    with pytest.raises(ValueError, match="checkpoint.every_seconds=-1"):
        SaveClock(-1, 5)


def test_run_py_saves_by_time_and_retention_treats_those_steps_like_any_other(tmp_path, data_dir):
    # 30 steps of at least 0.1 s each; saves every 1 s of wall time, step-count saves off (only the end).
    workdir = tmp_path / "run"
    flags = tiny_flags(data_dir, **{"task": "tests.slow_task", "run_type": "train", "train.num_steps": 30,
                                    "checkpoint.every_steps": 1000, "checkpoint.every_seconds": 1.0,
                                    "checkpoint.max_to_keep": 2, "checkpoint.keep_best": 0,
                                    "train.prefetch": 0})  # each step waits for its own slow batch
    done = run_cli([*flags, "--workdir", str(workdir)], env={"SLOW_TRAIN_SECONDS": "0.1"}, timeout=300)
    assert done.returncode == 0, done.stderr
    log = (workdir / "train.log").read_text()
    timed = [int(s) for s in re.findall(r"step (\d+): [\d.]+s since the last save, saving", log)]
    assert timed, log
    saved = timed + [30] if timed[-1] != 30 else timed
    # The clock starts after step 1 (compiling); each step takes >= 0.1 s, so 1 s has passed after at
    # most 10 steps: never more than 10 steps apart.
    assert all(0 < b - a <= 10 for a, b in zip([1] + saved, saved)), saved
    for seconds in re.findall(r"step \d+: ([\d.]+)s since the last save", log):
        assert float(seconds) >= 1.0
    # max_to_keep=2 keeps the newest two saves, whichever rule made them.
    kept = sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
    assert kept == saved[-2:]
