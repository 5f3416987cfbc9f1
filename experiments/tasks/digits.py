"""The offline default task: classify UCI handwritten digits (8x8) by digit or by parity.

Data: the tfds dataset `jaxckpt_digits` (see `digits_builder`), prepared on first use under
`config.data.data_dir`. Its `test` split (20%) is fixed; `val` is a fixed `config.data.val_fraction`
of its `train` split, chosen by a constant seed, so that neither changes with `config.seed`.
The records are read once through the tfds data source and kept in memory: per-record reads from
the ARRAY_RECORD files would double the cost of every training batch.

Config fields read:
    data.target: "digit" (10 classes) or "parity" (2 classes: even, odd).
    data.data_dir: tfds data directory; None or "" means `$JAXCKPT_DATA_DIR` or `~/.cache/jaxckpt/tfds`.
    data.val_fraction: share of the train split held out as `val`.
    model.encoder_dims, model.fusion_dims: MLP widths; model.dropout: dropout in the fusion MLP.
"""

from __future__ import annotations

import functools
from typing import Any, Mapping

import grain
import numpy as np

from experiments.tasks import data, digits_builder, models
from experiments.tasks.classifier import ClassifierTask, Split
from jaxckpt.errors import ConfigError

TARGETS = {
        "digit": tuple(str(d) for d in range(10)),
        "parity": ("even", "odd"),
}
"""Class names of each `config.data.target`, in logit order."""

_VAL_SEED = 1  # Fixed forever: `val` must not move when the run's seed changes.

# The records live in memory, so extra read threads would only contend for the GIL.
_READ_OPTIONS = grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)


def _transform(record: Mapping[str, Any], target: str) -> dict[str, np.ndarray]:
    """Scales pixels to [0, 1] and maps the digit to the configured target."""
    label = record["label"] if target == "digit" else record["label"] % 2
    return {"image": record["image"].astype(np.float32) / 16.0, "label": np.int32(label)}


def _read_all(source: data.RandomAccessSource) -> dict[str, np.ndarray]:
    """Reads every record of a tfds data source into arrays, ordered by example id."""
    records = [source[i] for i in range(len(source))]
    arrays = {key: np.stack([np.asarray(r[key]) for r in records]) for key in records[0]}
    order = np.argsort(arrays["id"], kind="stable")
    return {key: value[order] for key, value in arrays.items()}


def _split(arrays: Mapping[str, np.ndarray], indices: np.ndarray | None = None) -> Split:
    if indices is not None:
        arrays = {key: value[indices] for key, value in arrays.items()}
    return Split(source=data.ArraySource(arrays), ids=arrays["id"].astype(np.int64))


def build(config: Any, artifacts: Mapping[str, Any] | None = None) -> ClassifierTask:
    """Builds the digits task from `config` (preparing the dataset on first use).

    Args:
        config: an `ml_collections.ConfigDict` with the fields listed in the module docstring.
        artifacts: accepted for symmetry with other tasks and ignored: digits keep no artifacts.

    Returns:
        A `jaxckpt.runner.task.Task` whose batches hold `image` (float32 `[B, 8, 8]`) and `label` (int32).

    Raises:
        ValueError: if `config.data.target` is unknown, or a model width or `val_fraction` is invalid.

    Example:
        >>> task = build(get_config())  # experiments/configs/digits.py
        >>> task.num_examples("test")
        359
    """
    del artifacts  # Nothing to restore: the task is fully determined by the config.
    target = config.data.target
    if target not in TARGETS:
        raise ConfigError(f"config.data.target={target!r} is not one of {sorted(TARGETS)}.")
    model = models.DigitsClassifier(
            encoder_dims=models.parse_dims(config.model.encoder_dims, "model.encoder_dims"),
            fusion_dims=models.parse_dims(config.model.fusion_dims, "model.fusion_dims"),
            num_classes=len(TARGETS[target]),
            dropout=float(config.model.dropout),
    )

    builder = digits_builder.prepare(data.resolve_data_dir(config.data.data_dir))
    sources = builder.as_data_source()
    train = _read_all(sources["train"])
    train_indices, val_indices = data.split_indices(
            len(train["id"]), float(config.data.val_fraction), seed=_VAL_SEED
    )
    return ClassifierTask(
            model=model,
            class_names=TARGETS[target],
            input_key="image",
            example_input=np.zeros((1, 8, 8), np.float32),
            splits={
                    "train": _split(train, train_indices),
                    "val": _split(train, val_indices),
                    "test": _split(_read_all(sources["test"])),
            },
            transform=functools.partial(_transform, target=target),
            read_options=_READ_OPTIONS,
    )
