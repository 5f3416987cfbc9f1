"""Metric writers: every writer takes `writer.write(step, split, metrics)`, so the loop fans out with `MultiWriter`.

* `JsonlWriter` appends one JSON object per point to `metrics.jsonl`:
  `{"step": 100, "split": "val", "loss": 0.31, "accuracy": 0.9}`. Each line is flushed as it is
  written, so a crash loses at most the point being written. Non-finite values (NaN, inf) are
  written as `null`, which keeps every line valid JSON; `metrics_jsonl.read_metrics` reads them
  back as NaN.
* `TensorBoardWriter` writes the same points to event files with tags `<split>/<metric>`;
  `purge_step=step + 1` hides the points a resumed run logs again.

On a `gs://` / `s3://` workdir both write through whole-object uploads, as an object has no
append: `JsonlWriter` adds each line with `storage.append_line` (read, add, upload), and
`TensorBoardWriter` writes its event files to a local staging directory and uploads each to
`WORKDIR/tensorboard/<same name>` on `flush` and `close` (the loop flushes at every checkpoint).

`format_metrics` formats a point for a log line.

Example:

    with open_writers(workdir) as writer:
        writer.write(10, "train", {"loss": 0.7, "accuracy": 0.6})
"""

from __future__ import annotations

import json
import math
import os
import pathlib
import shutil
import tempfile
from typing import Any, Mapping, Protocol, Sequence

import numpy as np

from jaxckpt.checkpoint import storage
from jaxckpt.runner.rundir import run_file

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
            path: the JSONL file, local or a URL; existing points are kept (call `truncate_after`
                first on resume).
        """
        self.path = run_file(path)
        self._file = None
        self._closed = False
        if not storage.is_url(self.path):  # a URL is appended to line by line (`storage.append_line`)
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
        line = json.dumps(record, allow_nan=False) + "\n"
        if self._file is None:
            if self._closed:
                raise ValueError(f"write to {self.path} after close")
            storage.append_line(self.path, line)
            return
        self._file.write(line)
        self._file.flush()

    def flush(self) -> None:
        """Forces the lines written so far to disk (on an object store each line is uploaded as written)."""
        if self._file is not None:
            self._file.flush()
            os.fsync(self._file.fileno())

    def close(self) -> None:
        """Closes the file (idempotent)."""
        self._closed = True
        if self._file is not None and not self._file.closed:
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
            logdir: the directory of event files (created if needed), local or a URL; for a URL
                the files are staged in a local temporary directory and uploaded on `flush`/`close`.
            purge_step: on resume, the first step to be logged again; TensorBoard then hides the
                events from earlier runs at steps `>= purge_step`, so curves have no duplicates.
                A resumed run writes a new event file (next to the old ones, also on a URL).
        """
        # Imported here: only runs that write TensorBoard events pay for importing tensorboardX.
        from tensorboardX import SummaryWriter

        self.logdir = run_file(logdir)
        self._staging: pathlib.Path | None = None
        if storage.is_url(self.logdir):
            self._staging = pathlib.Path(tempfile.mkdtemp(prefix="jaxckpt-tensorboard-"))
            local = self._staging
        else:
            self.logdir.mkdir(parents=True, exist_ok=True)
            local = self.logdir
        self._writer = SummaryWriter(logdir=str(local), purge_step=purge_step)

    def write(self, step: int, split: str, metrics: Mapping[str, Any]) -> None:
        """Adds each metric as a scalar tagged `<split>/<name>` at `step`.

        Raises:
            ValueError: if a metric is not a scalar or is named `step` or `split`.
        """
        for name, value in _to_scalars(metrics).items():
            self._writer.add_scalar(f"{split}/{name}", value, global_step=int(step))

    def flush(self) -> None:
        """Writes pending events to the event file (and uploads it, for a URL `logdir`)."""
        self._writer.flush()
        self._upload()

    def close(self) -> None:
        """Flushes and closes the event file, uploads it for a URL `logdir` (idempotent)."""
        self._writer.close()
        self._upload()
        if self._staging is not None:
            shutil.rmtree(self._staging, ignore_errors=True)
            self._staging = None

    def _upload(self) -> None:
        """Uploads each staged event file whole to `logdir/<its name>`; nothing for a local `logdir`."""
        if self._staging is None:
            return
        for event_file in sorted(self._staging.iterdir()):
            if event_file.is_file():
                storage.write_bytes_atomic(self.logdir / event_file.name, event_file.read_bytes())


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
        workdir: the run directory, local or a `gs://` / `s3://` URL.
        tensorboard: whether to also write TensorBoard event files.
        purge_step: passed to `TensorBoardWriter` (the first step logged again after a resume).

    Returns:
        A `MultiWriter` over the JSONL writer and, if asked, the TensorBoard writer.
    """
    workdir = run_file(workdir)
    writers: list[MetricWriter] = [JsonlWriter(workdir / "metrics.jsonl")]
    if tensorboard:
        writers.append(TensorBoardWriter(workdir / "tensorboard", purge_step=purge_step))
    return MultiWriter(writers)


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
