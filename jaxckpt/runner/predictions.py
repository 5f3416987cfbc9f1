"""Writing a task's predictions: `predictions.csv`, or `predictions.jsonl` when a column is not scalar.

A task's `predict_fn` returns named per-example columns (`{column: [batch, ...] array}`); its
optional `format_predictions` turns a batch of them into per-example Python values (token ids into
text, say) on the host. A classification task (`class_names` and a single `[batch, classes]`
output) keeps its familiar CSV: `id, prediction, prob_<class>...`.

The file is written whole at the end: locally to a temporary name then renamed, on `gs://` /
`s3://` in one upload.
"""

from __future__ import annotations

import csv
import io
import json
from typing import IO, Any, Mapping

import numpy as np

from jaxckpt.checkpoint import storage


def _columns(task: Any, outputs: Any, rows: np.ndarray) -> dict[str, list]:
    """One batch's outputs at `rows` as `{column: [value per example]}`."""
    class_names = getattr(task, "class_names", None)
    if not isinstance(outputs, Mapping):
        outputs = np.asarray(outputs)
        if class_names is not None and outputs.ndim == 2 and outputs.shape[1] == len(class_names):
            probs = outputs[rows]
            columns = {"prediction": [class_names[int(i)] for i in probs.argmax(-1)]}
            columns.update({f"prob_{c}": [f"{p:.6f}" for p in probs[:, k]] for k, c in enumerate(class_names)})
            return columns
        outputs = {"prediction": outputs}
    picked = {name: np.asarray(values)[rows] for name, values in outputs.items()}
    fmt = getattr(task, "format_predictions", None)
    if callable(fmt):
        return {name: list(values) for name, values in fmt(picked).items()}
    return {name: [v.item() if v.ndim == 0 else v.tolist() for v in values] for name, values in picked.items()}


def _scalar(value: Any) -> bool:
    return isinstance(value, (str, int, float, bool, np.generic)) or value is None


class Writer:
    """Collects predictions batch by batch; `close` writes the file atomically and returns its path."""

    def __init__(self, workdir: storage.AnyPath, task: Any):
        self._workdir = workdir
        self._task = task
        self._ids: list[int] = []
        self._columns: dict[str, list] = {}

    def add(self, ids: np.ndarray, outputs: Any, rows: np.ndarray) -> None:
        """Adds the examples at `rows` of one batch (`ids` already picked at those rows)."""
        self._ids.extend(int(i) for i in ids)
        for name, values in _columns(self._task, outputs, rows).items():
            self._columns.setdefault(name, []).extend(values)

    def close(self) -> storage.AnyPath:
        """Writes `predictions.csv` (all columns scalar) or `predictions.jsonl`; returns its path."""
        scalar = all(_scalar(v) for values in self._columns.values() for v in values)
        path = self._workdir / ("predictions.csv" if scalar else "predictions.jsonl")
        if storage.is_url(path):
            text = io.StringIO(newline="")
            self._write(text, scalar)
            storage.write_bytes_atomic(path, text.getvalue().encode("utf-8"))
        else:
            tmp = path.with_name(path.name + ".tmp")
            with open(tmp, "w", newline="") as f:
                self._write(f, scalar)
            tmp.replace(path)
        # A file of the other kind from an earlier predict would now be stale.
        other = self._workdir / ("predictions.jsonl" if scalar else "predictions.csv")
        other.unlink(missing_ok=True)
        return path

    def _write(self, f: IO[str], scalar: bool) -> None:
        names = list(self._columns)
        if scalar:
            writer = csv.writer(f)
            writer.writerow(["id"] + names)
            for i, example_id in enumerate(self._ids):
                writer.writerow([example_id] + [self._columns[n][i] for n in names])
        else:
            for i, example_id in enumerate(self._ids):
                f.write(json.dumps({"id": example_id, **{n: self._columns[n][i] for n in names}}) + "\n")
