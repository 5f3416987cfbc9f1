"""Reading and truncating `metrics.jsonl`, the run's one JSON object per logged point.

On resume, `truncate_after(path, step)` drops the points logged after the restored checkpoint, so a
resumed run never shows the same step twice.

A path may be a `gs://` / `s3://` URL: reads go through `etils.epath`, and every change is one
whole-object upload (`storage.write_bytes_atomic` / `append_line`), as an object has no append or
rename. The flock that keeps a follower's appends and a truncation apart is local only: on an
object store the workdir lock is what keeps writers apart.

Example:

    val_points = [p for p in read_metrics(workdir / "metrics.jsonl") if p["split"] == "val"]
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import math
import os
import pathlib
import tempfile
from typing import Any, Callable, Iterator, Mapping

from jaxckpt.checkpoint import storage
from jaxckpt.checkpoint.storage import give_default_mode
from jaxckpt.runner.rundir import run_file

PathLike = str | os.PathLike[str]


def _parse_lines(path: storage.AnyPath) -> list[tuple[str, dict[str, Any]]]:
    """Parses a JSONL file into `(raw line, record)` pairs.

    A last line without a newline that does not parse is a write torn by a crash and is dropped;
    any other unparsable line is an error.
    """
    text = path.read_text(encoding="utf-8")
    lines = text.split("\n")
    out = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            if number == len(lines):  # the final chunk has no trailing newline
                break
            raise ValueError(
                    f"{path}:{number} is not valid JSON ({e}); fix or delete that line."
            ) from e
        if not isinstance(record, dict) or "step" not in record:
            raise ValueError(f"{path}:{number} is not a metric point (a JSON object with a 'step').")
        out.append((line, record))
    return out


def read_metrics(path: PathLike) -> list[dict[str, Any]]:
    """Reads every point of a `metrics.jsonl` file, in file order.

    Args:
        path: the JSONL file.

    Returns:
        One dict per point, e.g. `{"step": 100, "split": "val", "loss": 0.31}`; `null` values are
        returned as `float("nan")`. An absent file gives an empty list.

    Raises:
        ValueError: if a line other than a torn last line is not a JSON metric point.

    Example:

        val_points = [p for p in read_metrics("run/metrics.jsonl") if p["split"] == "val"]
    """
    path = run_file(path)
    if not path.exists():
        return []
    points = []
    for _, record in _parse_lines(path):
        points.append({k: (math.nan if v is None else v) for k, v in record.items()})
    return points


def atomic_write(path: PathLike, write_fn: Callable[[pathlib.Path], Any]) -> None:
    """Calls `write_fn(tmp_path)` then moves the temporary file over `path` in one rename.

    The file gets the mode a plain `open` would give it (not `mkstemp`'s 0600). Temporary files of
    an earlier write that was killed are removed first: one process writes a run's files (the
    workdir lock), so none of them is in use. For a URL `path`, `write_fn` writes a local
    temporary file, which is uploaded in one PUT.
    """
    if storage.is_url(path):
        with tempfile.TemporaryDirectory(prefix="jaxckpt-") as local:
            tmp = pathlib.Path(local) / run_file(path).name
            write_fn(tmp)
            storage.write_bytes_atomic(path, tmp.read_bytes())
        return
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in path.parent.glob(f".{path.name}.*.tmp"):
        stale.unlink(missing_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write_fn(pathlib.Path(tmp))
        give_default_mode(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def truncate_after(path: PathLike, step: int, *, dropped_to: PathLike | None = None) -> int:
    """Keeps only the points with `point["step"] <= step`, rewriting the file atomically.

    Call it when resuming from the checkpoint at `step`: the points the crashed run logged after
    that checkpoint would otherwise appear twice.

    Args:
        path: the JSONL file; an absent file is left absent.
        step: the last step to keep.
        dropped_to: where to keep the removed points (appended, as they were), e.g. beside the
            checkpoints set aside when a run continues from an older step; None discards them.

    Returns:
        The number of points removed (a torn last line is removed but not counted).

    Raises:
        ValueError: if the file holds a line that is not a JSON metric point.

    Example:

        truncate_after(workdir / "metrics.jsonl", restored_step)
    """
    path = run_file(path)
    if not path.exists():
        return 0
    if storage.is_url(path):
        return _truncate_after(path, step, dropped_to)
    with _appends_held(path):  # a follower evaluator appending now would land in the replaced file
        return _truncate_after(path, step, dropped_to)


def _truncate_after(path: storage.AnyPath, step: int, dropped_to: PathLike | None) -> int:
    parsed = _parse_lines(path)
    kept = [line for line, record in parsed if int(record["step"]) <= step]
    dropped = [line for line, record in parsed if int(record["step"]) > step]
    # The dropped points are written before the truncation: a crash in between leaves a copy, never a loss.
    if storage.is_url(path):
        if dropped and dropped_to is not None:
            storage.append_line(dropped_to, "\n".join(dropped))
        storage.write_bytes_atomic(path, "".join(line + "\n" for line in kept).encode("utf-8"))
        return len(parsed) - len(kept)
    if dropped and dropped_to is not None:
        with open(dropped_to, "a", encoding="utf-8") as f:
            f.write("".join(line + "\n" for line in dropped))
            f.flush()
            os.fsync(f.fileno())

    def write(tmp: pathlib.Path) -> None:
        tmp.write_text("".join(line + "\n" for line in kept), encoding="utf-8")

    atomic_write(path, write)
    return len(parsed) - len(kept)


@contextlib.contextmanager
def _appends_held(path: pathlib.Path) -> Iterator[int]:
    """An O_APPEND descriptor of the file now at `path`, flock'ed: appends and truncations never overlap.

    `truncate_after` replaces the file by a rename, so a writer that waited for the lock on the old
    file sees another inode at `path` once it gets it, and opens the new file instead.
    """
    while True:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            current = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            current = False
        if current:
            break
        os.close(fd)
    try:
        yield fd
    finally:
        os.close(fd)  # drops the flock


def append_point(path: PathLike, step: int, split: str, metrics: Mapping[str, int | float | None]) -> None:
    """Appends one point to a `metrics.jsonl` another process may be writing too.

    For a second writer beside the training run's own `JsonlWriter` (e.g. a follower evaluator):
    the file is opened with O_APPEND and the line goes out in one `write()`, which a local POSIX
    filesystem never interleaves with another appender's line; an flock on the file keeps it from
    landing in a file `truncate_after` is replacing.

    Args:
        path: the JSONL file (created if absent).
        step: the training step the metrics belong to.
        split: the data split, e.g. `"val"`.
        metrics: Python scalars by name (as `mean_metrics` returns them); NaN and inf are written as `null`.
    """
    path = run_file(path)
    record: dict[str, Any] = {"step": int(step), "split": str(split)}
    for name, value in metrics.items():
        finite = value is not None and (isinstance(value, int) or math.isfinite(value))
        record[name] = value if finite else None
    line = (json.dumps(record, allow_nan=False) + "\n").encode("utf-8")
    if storage.is_url(path):  # one read and rewrite of the object; the workdir lock keeps writers apart
        storage.append_line(path, line.decode("utf-8"))
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with _appends_held(path) as fd:
        os.write(fd, line)
        os.fsync(fd)
