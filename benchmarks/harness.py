"""What every benchmark shares: records, modes, side-by-side medians, durable writes, a cold cache.

Timing rules, because the machines these run on are shared and noisy:

* every candidate (jaxckpt and its baselines) runs once per repetition, in a rotating order, so
  a slow spell of the machine hits them all alike; each figure is the median over repetitions;
* what is timed is the operation alone: set-up (building trees, deleting old files) is outside;
* writes are made durable (fsync) before the clock stops, for jaxckpt and baselines alike;
* reads start from a cold page cache: the files are evicted with `posix_fadvise(DONTNEED)` after
  they are written (no root needed; `drop_caches` would need it), and the evicted bytes are
  checked through `/proc/self/io`.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
import shutil
import statistics
import time
from typing import Callable, Mapping

MODES = ("smoke", "quick", "full")
"""`smoke`: seconds, for tests; `quick`: under 3 minutes on 2 cores; `full`: the real sizes."""

MiB = 2**20


@dataclasses.dataclass(frozen=True)
class Record:
    """One figure: jaxckpt's `value` beside a `baseline`; `ratio` > 1 means jaxckpt is better.

    Attributes:
      name: the record's stable name (e.g. `"save_large"`).
      value: jaxckpt's figure, in `unit`.
      unit: e.g. `"MB/s"`, `"steps/s"`, `"s"`.
      baseline: the baseline's figure in the same unit (None where there is none).
      baseline_name: what the baseline is, in words.
      ratio: oriented so that higher is better for jaxckpt; 1.0 is parity.
      goal: the target, in words (e.g. `"ratio >= 0.9"`); None for informational records.
    """

    name: str
    value: float
    unit: str
    baseline: float | None
    baseline_name: str
    ratio: float | None
    goal: str | None

    def met(self) -> bool | None:
        """Whether the goal is met (None for a record without a goal)."""
        if not self.goal:
            return None
        subject, op, bound = self.goal.split()[:3]
        x = self.ratio if subject == "ratio" else self.value
        return x is not None and (x >= float(bound) if op == ">=" else x < float(bound))


def rounds(mode: str, smoke: int, quick: int, full: int) -> int:
    """The number (or size) for `mode`."""
    return {"smoke": smoke, "quick": quick, "full": full}[mode]


def side_by_side(candidates: Mapping[str, Callable[[], float]], repetitions: int) -> dict[str, float]:
    """Median of each candidate's self-timed result over `repetitions` rotating rounds.

    Args:
      candidates: name -> callable that runs once and returns its own measured figure (seconds,
        or any figure), so that set-up and tear-down stay outside the measurement.
      repetitions: rounds; in round r the candidates start from position r (rotation).

    Returns:
      name -> median figure.
    """
    names = list(candidates)
    results: dict[str, list[float]] = {n: [] for n in names}
    for r in range(repetitions):
        for n in names[r % len(names):] + names[: r % len(names)]:
            results[n].append(candidates[n]())
    return {n: statistics.median(v) for n, v in results.items()}


class Stopwatch:
    """`with Stopwatch() as sw: ...` then `sw.seconds`."""

    def __enter__(self) -> "Stopwatch":
        self._start = time.perf_counter()
        return self

    def __exit__(self, *exc_info) -> None:
        self.seconds = time.perf_counter() - self._start


def files_under(path: os.PathLike | str) -> list[pathlib.Path]:
    path = pathlib.Path(path)
    return [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]


def fsync_tree(path: os.PathLike | str) -> None:
    """fsyncs every file and directory under `path` (cheap when they are already durable)."""
    path = pathlib.Path(path)
    for p in files_under(path) + [d for d in [path, *path.rglob("*")] if d.is_dir()]:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def evict(path: os.PathLike | str) -> None:
    """Drops the page cache of every file under `path`, so the next read comes from the disk."""
    for p in files_under(path):
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)  # only clean pages can be evicted
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def io_counters() -> dict[str, int]:
    """This process's `/proc/self/io` (all threads): `read_bytes` is what came from the disk."""
    try:
        with open("/proc/self/io") as f:
            return {k: int(v) for k, v in (line.split(": ") for line in f.read().splitlines() if line)}
    except OSError:
        return {}


def fresh_dir(path: os.PathLike | str) -> pathlib.Path:
    """An empty directory at `path` (removing what was there)."""
    path = pathlib.Path(path)
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    return path


def timed_write(out: os.PathLike | str, opener: Callable) -> Callable[[], float]:
    """A timing of one write: `opener(directory)` prepares (untimed) and returns `(write, close)`.

    Each call writes into a fresh directory under `out`, times `write()` plus an fsync of what it
    wrote, then closes (untimed) and removes the directory.
    """
    def once() -> float:
        target = fresh_dir(out)
        write, close = opener(target)
        with Stopwatch() as sw:
            write()
            fsync_tree(target)
        close()
        shutil.rmtree(target)
        return sw.seconds
    return once


def timed_cold_read(path: os.PathLike | str, read: Callable) -> Callable[[], float]:
    """A timing of one read from a cold page cache: `path` is evicted, then `read()` is timed to completion."""
    import jax

    def once() -> float:
        evict(path)
        with Stopwatch() as sw:
            jax.block_until_ready(read())
        return sw.seconds
    return once


def mbps(nbytes: int, seconds: float) -> float:
    return nbytes / MiB / seconds


def throughput_records(name: str, speed: Mapping[str, float], baselines: Mapping[str, str], goal: str | None,
                       goals: Mapping[str, str] | None = None) -> list[Record]:
    """jaxckpt's MB/s (`speed["jaxckpt"]`) against each baseline that ran.

    Args:
      name: the record name; the first baseline's record carries it and `goal`, the others are
        `name_<baseline>` with their goal in `goals`, if any.
      speed: MB/s by candidate name.
      baselines: candidate name -> what it is, in words, in order.
      goal: the first record's goal.
      goals: goals of the other records, by baseline name (those not named have none).
    """
    goals = {**(goals or {}), next(b for b in baselines if b in speed): goal}
    records = []
    for i, (baseline, what) in enumerate((b, w) for b, w in baselines.items() if b in speed):
        records.append(Record(name if i == 0 else f"{name}_{baseline}", speed["jaxckpt"], "MB/s", speed[baseline],
                              what, speed["jaxckpt"] / speed[baseline], goals.get(baseline)))
    return records


def format_table(records: list[Record]) -> str:
    """A fixed-width table of records, with a column saying whether each goal is met."""
    head = ("name", "value", "unit", "baseline", "ratio", "goal", "met", "baseline is")
    rows = [head]
    for r in records:
        met = r.met()
        rows.append((
            r.name, _num(r.value), r.unit, _num(r.baseline), _num(r.ratio), r.goal or "-",
            "-" if met is None else ("yes" if met else "NO"), r.baseline_name,
        ))
    widths = [max(len(row[i]) for row in rows) for i in range(len(head) - 1)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)) + "  " + row[-1] for row in rows]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


def _num(x: float | None) -> str:
    if x is None:
        return "-"
    return f"{x:.3g}" if abs(x) < 1000 else f"{x:.0f}"
