"""IMDB movie-review sentiment (tfds `imdb_reviews/plain_text`): neg / pos from the review text.

Data: tfds downloads and prepares the dataset once (internet needed, no TensorFlow: see
`imdb_builder`) under `config.data.data_dir` in ARRAY_RECORD format; tests use
`tfds.testing.mock_data`. `test` is tfds' test split; `val` is a
fixed `config.data.val_fraction` of tfds' train split, chosen by a constant seed. Example ids are
record indices within tfds' split.

Text becomes `max_length` word ids through a vocabulary of the `vocab_size` most frequent words of
the task's train split (see `tokenizer`). The vocabulary is the task's artifact: it is saved with
the run and passed back to `build` on resume, so ids never shift.

Config fields read:
    data.target: must be "sentiment" (the two IMDB labels).
    data.data_dir: tfds data directory; None or "" means `$JAXCKPT_DATA_DIR` or `~/.cache/jaxckpt/tfds`.
    data.val_fraction: share of the train split held out as `val`.
    data.vocab_size: words kept in the vocabulary (the embedding has `vocab_size + 2` rows).
    data.max_length: tokens per review after truncation / padding.
    model.embed_dim, model.encoder_dims, model.fusion_dims, model.dropout: the text model.
"""

from __future__ import annotations

import functools
from typing import Any, Mapping

import numpy as np

from experiments.tasks import data, imdb_builder, models
from experiments.tasks import tokenizer as tokenizer_lib
from experiments.tasks.classifier import ClassifierTask, Split
from jaxckpt.errors import ConfigError

TARGET = "sentiment"
_VAL_SEED = 1  # Fixed forever: `val` must not move when the run's seed changes.


def _transform(record: Mapping[str, Any], tokenizer: tokenizer_lib.Tokenizer, max_length: int) -> dict[str, np.ndarray]:
    """Tokenizes the review and keeps its label."""
    return {"tokens": tokenizer.encode(record["text"], max_length), "label": np.int32(record["label"])}


def _checked_vocab(artifacts: Mapping[str, Any], vocab_size: int) -> list[str]:
    """The saved vocabulary from `artifacts`, checked against the configured embedding size."""
    if "vocab" not in artifacts:
        raise ValueError(
                f"IMDB artifacts have keys {sorted(artifacts)} but no 'vocab'; pass what Task.artifacts() "
                "returned for the run, or None to build a new vocabulary."
        )
    vocab = list(artifacts["vocab"])
    if len(vocab) > vocab_size + 2:
        raise ConfigError(
                f"The saved vocabulary has {len(vocab)} entries but config.data.vocab_size={vocab_size} "
                f"allows {vocab_size + 2} (with <pad>, <unk>); set config.data.vocab_size={len(vocab) - 2}."
        )
    return vocab


def build(config: Any, artifacts: Mapping[str, Any] | None = None) -> ClassifierTask:
    """Builds the IMDB task from `config` (preparing the dataset on first use).

    Args:
        config: an `ml_collections.ConfigDict` with the fields listed in the module docstring.
        artifacts: what `Task.artifacts()` returned for an earlier run (`{"vocab": [...]}`); its
            vocabulary is used instead of counting words again. None builds a new vocabulary.

    Returns:
        A `jaxckpt.runner.task.Task` whose artifacts are `{"vocab": [...]}` and whose batches hold
        `tokens` (int32 `[B, max_length]`) and `label` (int32).

    Raises:
        ValueError: if `config.data.target` is not "sentiment", a model width or `val_fraction`
            is invalid, or the saved vocabulary is not usable with this config.

    Example:
        >>> task = build(get_config())  # experiments/configs/imdb.py
        >>> same = build(get_config(), artifacts=task.artifacts())  # no word counting
    """
    if config.data.target != TARGET:
        raise ConfigError(f"config.data.target={config.data.target!r}; IMDB has only {TARGET!r} (neg / pos).")
    vocab_size = int(config.data.vocab_size)
    max_length = int(config.data.max_length)
    if max_length < 1:
        raise ConfigError(f"config.data.max_length must be positive, got {max_length}.")
    encoder_dims = models.parse_dims(config.model.encoder_dims, "model.encoder_dims", allow_empty=True)
    fusion_dims = models.parse_dims(config.model.fusion_dims, "model.fusion_dims")

    builder = imdb_builder.prepare(data.resolve_data_dir(config.data.data_dir))
    train_source = builder.as_data_source(split="train")
    test_source = builder.as_data_source(split="test")
    train_indices, val_indices = data.split_indices(
            len(train_source), float(config.data.val_fraction), seed=_VAL_SEED
    )
    train = data.Subset(train_source, train_indices)
    val = data.Subset(train_source, val_indices)

    if artifacts is not None:
        vocab = _checked_vocab(artifacts, vocab_size)
    else:
        vocab = tokenizer_lib.build_vocab((train[i]["text"] for i in range(len(train))), vocab_size)
    tokenizer = tokenizer_lib.Tokenizer(vocab)

    model = models.TextClassifier(
            vocab_size=vocab_size + 2,  # Fixed by the config, not by the data, so shapes are predictable.
            embed_dim=int(config.model.embed_dim),
            encoder_dims=encoder_dims,
            fusion_dims=fusion_dims,
            num_classes=2,
            dropout=float(config.model.dropout),
    )
    return ClassifierTask(
            model=model,
            class_names=builder.info.features["label"].names,
            input_key="tokens",
            example_input=np.zeros((1, max_length), np.int32),
            splits={
                    "train": Split(train, train.indices),
                    "val": Split(val, val.indices),
                    "test": Split(test_source, np.arange(len(test_source), dtype=np.int64)),
            },
            transform=functools.partial(_transform, tokenizer=tokenizer, max_length=max_length),
            artifacts={"vocab": tokenizer.vocab},
    )
