"""Metric writers (JSONL, TensorBoard), reading and truncating `metrics.jsonl`, and `curves.png`.

A run logs scalar metrics as points `(step, split, {name: value})`. Every writer here takes the same
call, `writer.write(step, split, metrics)`, so the loop fans out to all of them with a `MultiWriter`:

* `JsonlWriter` appends one JSON object per point to `metrics.jsonl`:
  `{"step": 100, "split": "val", "loss": 0.31, "accuracy": 0.9}`. Each line is flushed as it is
  written, so a crash loses at most the point being written. Non-finite values (NaN, inf) are
  written as `null`, which keeps every line valid JSON; `read_metrics` reads them back as NaN.
* `TensorBoardWriter` writes the same points to event files with tags `<split>/<metric>`.

On resume, `truncate_after(path, step)` drops the points logged after the restored checkpoint, so a
resumed run never shows the same step twice; `TensorBoardWriter(..., purge_step=step + 1)` does the
same for TensorBoard. `plot_curves` redraws `curves.png` from `metrics.jsonl`.

Example:

    with open_writers(workdir) as writer:
        writer.write(10, "train", {"loss": 0.7, "accuracy": 0.6})
    plot_curves(workdir / "metrics.jsonl", workdir / "curves.png")
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import math
import os
import pathlib
import tempfile
from typing import Any, Iterator, Mapping, Protocol, Sequence

import numpy as np

PathLike = str | os.PathLike[str]

_RESERVED_KEYS = ("step", "split")


class MetricWriter(Protocol):
    """Anything that records scalar metric points; all writers in this module satisfy it."""

    def write(self, step: int, split: str, metrics: Mapping[str, Any]) -> None:
        """Records `metrics` (scalars) of `split` (e.g. `"train"`, `"val"`) at `step`."""

    def flush(self) -> None:
        """Makes everything written so far durable."""

    def close(self) -> None:
        """Flushes and releases the writer's resources; later writes are errors."""


def _to_scalars(metrics: Mapping[str, Any]) -> dict[str, float | int]:
    """Converts metric values (Python, NumPy or JAX scalars) to Python floats, or ints for integers.

    Counts such as `num_examples` stay integers, so `metrics.jsonl` agrees with `eval_*.json`.
    """
    out = {}
    for name, value in metrics.items():
        if name in _RESERVED_KEYS:
            raise ValueError(
                    f"Metric name {name!r} is reserved in metrics.jsonl (it holds the point's {name}); "
                    "rename the metric."
            )
        array = np.asarray(value)
        if array.size != 1:
            raise ValueError(
                    f"Metric {name!r} has shape {array.shape}; only scalars can be logged. Reduce it "
                    "(e.g. take the mean) before writing."
            )
        scalar = array.reshape(())
        out[name] = int(scalar) if np.issubdtype(array.dtype, np.integer) else float(scalar)
    return out


class _WriterBase:
    """Context-manager plumbing shared by the writers."""

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


class JsonlWriter(_WriterBase):
    """Appends one JSON object per metric point to a `metrics.jsonl` file.

    Example:

        writer = JsonlWriter(workdir / "metrics.jsonl")
        writer.write(100, "val", {"loss": 0.31, "accuracy": 0.9})
        writer.close()
    """

    def __init__(self, path: PathLike):
        """Opens `path` for appending, creating it and its parent directory if needed.

        Args:
            path: the JSONL file; existing points are kept (call `truncate_after` first on resume).
        """
        self.path = pathlib.Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "a", encoding="utf-8")

    def write(self, step: int, split: str, metrics: Mapping[str, Any]) -> None:
        """Appends `{"step": step, "split": split, **metrics}` as one line and flushes it.

        Args:
            step: the training step the metrics belong to.
            split: the data split, e.g. `"train"` or `"val"`.
            metrics: scalar values by name; NaN and inf are written as `null`.

        Raises:
            ValueError: if a metric is not a scalar or is named `step` or `split`.
        """
        record = {"step": int(step), "split": str(split)}
        for name, value in _to_scalars(metrics).items():
            record[name] = value if math.isfinite(value) else None
        self._file.write(json.dumps(record, allow_nan=False) + "\n")
        self._file.flush()

    def flush(self) -> None:
        """Forces the lines written so far to disk."""
        self._file.flush()
        os.fsync(self._file.fileno())

    def close(self) -> None:
        """Closes the file (idempotent)."""
        if not self._file.closed:
            self._file.close()


class TensorBoardWriter(_WriterBase):
    """Writes metric points to TensorBoard event files, tagged `<split>/<metric>`.

    Example:

        writer = TensorBoardWriter(workdir / "tensorboard")
        writer.write(100, "train", {"loss": 0.5})
        writer.close()
    """

    def __init__(self, logdir: PathLike, *, purge_step: int | None = None):
        """Creates an event-file writer in `logdir`.

        Args:
            logdir: the directory of event files (created if needed).
            purge_step: on resume, the first step to be logged again; TensorBoard then hides the
                events from earlier runs at steps `>= purge_step`, so curves have no duplicates.
        """
        # Imported here so that reading metrics does not pay for importing tensorboardX.
        from tensorboardX import SummaryWriter

        self.logdir = pathlib.Path(logdir)
        self.logdir.mkdir(parents=True, exist_ok=True)
        self._writer = SummaryWriter(logdir=str(self.logdir), purge_step=purge_step)

    def write(self, step: int, split: str, metrics: Mapping[str, Any]) -> None:
        """Adds each metric as a scalar tagged `<split>/<name>` at `step`.

        Raises:
            ValueError: if a metric is not a scalar or is named `step` or `split`.
        """
        for name, value in _to_scalars(metrics).items():
            self._writer.add_scalar(f"{split}/{name}", value, global_step=int(step))

    def flush(self) -> None:
        """Writes pending events to the event file."""
        self._writer.flush()

    def close(self) -> None:
        """Flushes and closes the event file (idempotent)."""
        self._writer.close()


class MultiWriter(_WriterBase):
    """Fans every call out to several writers, in order.

    Example:

        writer = MultiWriter([JsonlWriter(path), TensorBoardWriter(logdir)])
        writer.write(1, "train", {"loss": 1.0})
    """

    def __init__(self, writers: Sequence[MetricWriter]):
        """Wraps `writers`; closing the `MultiWriter` closes each of them."""
        self.writers = list(writers)

    def write(self, step: int, split: str, metrics: Mapping[str, Any]) -> None:
        """Writes the point to every writer."""
        for writer in self.writers:
            writer.write(step, split, metrics)

    def flush(self) -> None:
        """Flushes every writer."""
        for writer in self.writers:
            writer.flush()

    def close(self) -> None:
        """Closes every writer."""
        for writer in self.writers:
            writer.close()


def open_writers(workdir: PathLike, *, tensorboard: bool = True,
                 purge_step: int | None = None) -> MultiWriter:
    """Opens the standard writers of a run directory: `metrics.jsonl` and `tensorboard/`.

    Args:
        workdir: the run directory.
        tensorboard: whether to also write TensorBoard event files.
        purge_step: passed to `TensorBoardWriter` (the first step logged again after a resume).

    Returns:
        A `MultiWriter` over the JSONL writer and, if asked, the TensorBoard writer.
    """
    workdir = pathlib.Path(workdir)
    writers: list[MetricWriter] = [JsonlWriter(workdir / "metrics.jsonl")]
    if tensorboard:
        writers.append(TensorBoardWriter(workdir / "tensorboard", purge_step=purge_step))
    return MultiWriter(writers)


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


def _atomic_write(path: pathlib.Path, write_fn) -> None:
    """Calls `write_fn(tmp_path)` then moves the temporary file over `path` in one rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write_fn(pathlib.Path(tmp))
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
    with _appends_held(path):  # a follower evaluator appending now would land in the replaced file
        return _truncate_after(path, step, dropped_to)


def _truncate_after(path: pathlib.Path, step: int, dropped_to: PathLike | None) -> int:
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

    _atomic_write(path, write)
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


def append_point(path: PathLike, step: int, split: str, metrics: Mapping[str, Any]) -> None:
    """Appends one point to a `metrics.jsonl` another process may be writing too.

    For a second writer beside the training run's own `JsonlWriter` (e.g. a follower evaluator):
    the file is opened with O_APPEND and the line goes out in one `write()`, which a local POSIX
    filesystem never interleaves with another appender's line; an flock on the file keeps it from
    landing in a file `truncate_after` is replacing.

    Args:
        path: the JSONL file (created if absent).
        step: the training step the metrics belong to.
        split: the data split, e.g. `"val"`.
        metrics: scalar values by name; NaN and inf are written as `null`.
    """
    path = pathlib.Path(path)
    record = {"step": int(step), "split": str(split)}
    for name, value in _to_scalars(metrics).items():
        record[name] = value if math.isfinite(value) else None
    line = (json.dumps(record, allow_nan=False) + "\n").encode("utf-8")
    path.parent.mkdir(parents=True, exist_ok=True)
    with _appends_held(path) as fd:
        os.write(fd, line)
        os.fsync(fd)


def format_metrics(metrics: Mapping[str, Any]) -> str:
    """Formats metrics for a log line: `loss=0.3127 accuracy=0.9`, in the given order.

    Args:
        metrics: scalar values by name (Python, NumPy or JAX scalars).

    Returns:
        Space-separated `name=value` pairs; integers print as integers, floats with 4 significant
        digits.

    Example:

        logging.info("step %d: %s", step, format_metrics({"loss": 0.31274, "accuracy": 0.9}))
    """
    parts = []
    for name, value in metrics.items():
        array = np.asarray(value)
        if array.size == 1 and np.issubdtype(array.dtype, np.integer):
            parts.append(f"{name}={int(array.reshape(()))}")
        elif array.size == 1 and np.issubdtype(array.dtype, np.number):
            parts.append(f"{name}={float(array.reshape(())):.4g}")
        else:
            parts.append(f"{name}={value}")
    return " ".join(parts)


_SPLIT_STYLES = {"train": dict(color="tab:blue", alpha=0.8), "val": dict(color="tab:orange", marker="o")}


def _draw_panel(axes, points: list[dict[str, Any]], metric: str) -> None:
    """Draws `metric` against step, one line per split, on `axes`."""
    present = {p.get("split", "?") for p in points if metric in p}
    # train and val first, in that order, then any other split alphabetically.
    splits = [s for s in _SPLIT_STYLES if s in present] + sorted(present - set(_SPLIT_STYLES))
    for split in splits:
        series = sorted((p["step"], p[metric]) for p in points if p.get("split", "?") == split and metric in p)
        steps, values = zip(*series)
        style = dict(_SPLIT_STYLES.get(split, {}))
        if len(series) > 50:
            style.pop("marker", None)
        axes.plot(steps, values, label=split, markersize=3, **style)
    axes.set_title(metric)
    axes.set_xlabel("step")
    axes.grid(True, alpha=0.3)
    if splits:
        axes.legend()
    else:
        axes.text(0.5, 0.5, f"no {metric!r} logged yet", ha="center", va="center",
                  transform=axes.transAxes, color="gray")


def plot_curves(metrics_path: PathLike, out_png: PathLike, *, main_metric: str = "accuracy") -> pathlib.Path:
    """Draws `curves.png`: loss per split against step, and `main_metric` per split against step.

    Cheap enough to call at every evaluation: it uses the Agg canvas directly (no display, no pyplot
    global state) and replaces the PNG atomically, so a viewer never sees a half-written image.
    Panels without data say so instead of failing (e.g. before the first evaluation).

    Args:
        metrics_path: the run's `metrics.jsonl`.
        out_png: where to write the figure.
        main_metric: the metric of the second panel; with `main_metric="loss"` only one panel is drawn.

    Returns:
        The path of the written PNG.

    Raises:
        ValueError: if `metrics_path` holds a line that is not a JSON metric point.

    Example:

        plot_curves(workdir / "metrics.jsonl", workdir / "curves.png", main_metric="accuracy")
    """
    # Figure + FigureCanvasAgg rather than pyplot: no backend selection, safe off the main thread.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    points = read_metrics(metrics_path)
    metrics = ["loss"] if main_metric == "loss" else ["loss", main_metric]
    figure = Figure(figsize=(5.5 * len(metrics), 4), layout="constrained")
    FigureCanvasAgg(figure)
    for axes, metric in zip(figure.subplots(1, len(metrics), squeeze=False)[0], metrics):
        _draw_panel(axes, points, metric)
    out_png = pathlib.Path(out_png)
    _atomic_write(out_png, lambda tmp: figure.savefig(tmp, format="png", dpi=100))
    return out_png
