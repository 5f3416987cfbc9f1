"""Reading and truncating `metrics.jsonl`, the run's one JSON object per logged point.

On resume, `truncate_after(path, step)` drops the points logged after the restored checkpoint, so a
resumed run never shows the same step twice.

Example:

    val_points = [p for p in read_metrics(workdir / "metrics.jsonl") if p["split"] == "val"]
"""

from __future__ import annotations

import json
import math
import os
import pathlib
import tempfile
from typing import Any, Callable

from jaxckpt.checkpoint.storage import give_default_mode

PathLike = str | os.PathLike[str]


def _parse_lines(path: pathlib.Path) -> list[tuple[str, dict[str, Any]]]:
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
    path = pathlib.Path(path)
    if not path.exists():
        return []
    points = []
    for _, record in _parse_lines(path):
        points.append({k: (math.nan if v is None else v) for k, v in record.items()})
    return points


def atomic_write(path: pathlib.Path, write_fn: Callable[[pathlib.Path], Any]) -> None:
    """Calls `write_fn(tmp_path)` then moves the temporary file over `path` in one rename.

    The file gets the mode a plain `open` would give it (not `mkstemp`'s 0600). Temporary files of
    an earlier write that was killed are removed first: one process writes a run's files (the
    workdir lock), so none of them is in use.
    """
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
    path = pathlib.Path(path)
    if not path.exists():
        return 0
    parsed = _parse_lines(path)
    kept = [line for line, record in parsed if int(record["step"]) <= step]
    dropped = [line for line, record in parsed if int(record["step"]) > step]
    if dropped and dropped_to is not None:
        # Written before the truncation: a crash in between leaves a copy, never a loss.
        with open(dropped_to, "a", encoding="utf-8") as f:
            f.write("".join(line + "\n" for line in dropped))
            f.flush()
            os.fsync(f.fileno())

    def write(tmp: pathlib.Path) -> None:
        tmp.write_text("".join(line + "\n" for line in kept), encoding="utf-8")

    atomic_write(path, write)
    return len(parsed) - len(kept)
