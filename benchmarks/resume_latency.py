"""How long from process start to the first train step, resuming a run vs starting it fresh?

Both sides are subprocesses of `python experiments/run.py` on the digits config (`run_type=train`,
logging every step). The clock starts just before the process is spawned and stops when its
stderr shows the first "step N/M" line, which the loop logs right after that step's update.
Fresh: an empty workdir, first step 1. Resume: a copy of a workdir holding a checkpoint of step
K (written once, untimed), first step K+1; the resume path reads the checkpoint, verifies its
checksums, restores the data iterator and then compiles the same train step as the fresh one.
`ratio` = fresh / resume: 1.0 means resuming costs nothing extra.

  python -m benchmarks.resume_latency [--quick | --smoke]
"""

from __future__ import annotations

import os
import pathlib
import re
import shutil
import subprocess
import sys
import time

from benchmarks import harness
from benchmarks.harness import Record

NAME = "resume_latency"
ROOT = pathlib.Path(__file__).resolve().parents[1]
_STEP_LINE = re.compile(rb"step (\d+)/\d+")
_CHECKPOINT_STEP = 20


def _command(workdir: pathlib.Path, num_steps: int) -> list[str]:
    return [sys.executable, str(ROOT / "experiments" / "run.py"),
            "--config", str(ROOT / "experiments" / "configs" / "digits.py"),
            "--workdir", str(workdir), "--config.run_type=train",
            f"--config.train.num_steps={num_steps}", "--config.train.log_every_steps=1",
            f"--config.checkpoint.every_steps={_CHECKPOINT_STEP}"]


def seconds_to_first_step(workdir: pathlib.Path, num_steps: int, env: dict[str, str] | None = None) -> float:
    """Spawns a run and returns the seconds until it logs its first step (then lets it finish)."""
    start = time.perf_counter()
    proc = subprocess.Popen(_command(workdir, num_steps), cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, env={**os.environ, **(env or {})})
    seen, tail = None, []
    for line in proc.stderr:
        if seen is None and _STEP_LINE.search(line):
            seen = time.perf_counter() - start
        tail = (tail + [line])[-20:]
    if proc.wait() != 0 or seen is None:
        raise RuntimeError(f"{' '.join(_command(workdir, num_steps))} failed (exit {proc.returncode}):\n"
                           + b"".join(tail).decode(errors="replace"))
    return seen


def run(mode: str, workdir: pathlib.Path) -> list[Record]:
    reps = harness.rounds(mode, 1, 3, 5)
    base = workdir / f"{NAME}_base"
    shutil.rmtree(base, ignore_errors=True)
    seconds_to_first_step(base, _CHECKPOINT_STEP)  # the checkpoint to resume; also prepares the data

    def fresh() -> float:
        run_dir = workdir / f"{NAME}_fresh"
        shutil.rmtree(run_dir, ignore_errors=True)
        return seconds_to_first_step(run_dir, 1)

    def resume() -> float:
        run_dir = workdir / f"{NAME}_resume"
        shutil.rmtree(run_dir, ignore_errors=True)
        shutil.copytree(base, run_dir)
        return seconds_to_first_step(run_dir, _CHECKPOINT_STEP + 1)

    t = harness.side_by_side({"fresh": fresh, "resume": resume}, reps)
    for d in ("base", "fresh", "resume"):
        shutil.rmtree(workdir / f"{NAME}_{d}", ignore_errors=True)
    return [Record(NAME, t["resume"], "s", t["fresh"],
                   "seconds from spawn to first step of experiments/run.py (digits) starting fresh",
                   t["fresh"] / t["resume"], "ratio >= 0.833")]


if __name__ == "__main__":
    from benchmarks.run import main_for

    main_for(run)
