"""IMDB sentiment with a BERT-family Hugging Face encoder and a fresh classification head.

The model is `BertForSequenceClassification` (`experiments.tasks.hf_modules`) built from an HF
config (see `hf_models.task_config`: usually the `config.json` of `checkpoint.pretrained=hf:DIR`)
with two labels, so its params are `bert/...` (what a `BertModel` folder holds, grafted with
`checkpoint.mapping=':bert'`) and `classifier/...` (fresh).

Tokens: a BERT folder's WordPiece vocabulary is not part of its weights, and the offline fixtures
have none, so words (`tokenizer.words`) are hashed into the model's vocabulary: id 0 is padding,
id 1 starts every review (the position BERT pools, as `[CLS]`), and a word becomes
`2 + crc32(word) % (vocab_size - 2)`. Every id is inside the embedding table whatever its size,
and no vocabulary has to be counted or saved; with a real pretrained BERT the ids do not match the
ones it was trained with, so its embeddings start as noise for this task (its encoder does not).
The attention mask is `input_ids != 0`.

Data: as `experiments.tasks.imdb` (tfds `imdb_reviews`, `val` a fixed share of train), prepared
only when batches are first needed, so `python -m jaxckpt plan` works offline.

Config fields read:
    data.target: must be "sentiment".
    data.data_dir, data.val_fraction: as for `experiments.tasks.imdb`.
    data.max_length: tokens per review (at most the model's `max_position_embeddings`).
    model.hf_config: HF config.json or folder of the model; "" = checkpoint.pretrained's.
"""

from __future__ import annotations

import dataclasses
import functools
import zlib
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from experiments.tasks import data, hf_models, imdb_builder
from experiments.tasks import tokenizer as tokenizer_lib
from experiments.tasks.classifier import ClassifierTask, Split

TARGET = "sentiment"
CLASS_NAMES = ("neg", "pos")  # tfds imdb_reviews' label names, in label order.
PAD, CLS = 0, 1
_VAL_SEED = 1  # Fixed forever, as in experiments.tasks.imdb.


def encode(text: str | bytes, vocab_size: int, max_length: int) -> np.ndarray:
    """`[CLS, hash(word), ...]` padded with 0 to `max_length` (int32); see the module docstring.

    Example:
        >>> encode("Great film", vocab_size=100, max_length=5).tolist()
        [1, 25, 26, 0, 0]
    """
    ids = [CLS] + [2 + zlib.crc32(word.encode()) % (vocab_size - 2)
                   for word in tokenizer_lib.words(text)]
    ids = ids[:max_length]
    out = np.full(max_length, PAD, np.int32)
    out[:len(ids)] = ids
    return out


@dataclasses.dataclass(frozen=True)
class PaddedText:
    """A text module called with `input_ids` alone; the attention mask comes from the padding.

    Stands in for a Flax module in `ClassifierTask` (which calls `init` and `apply` with one input)
    without adding a level to the param tree, so the params keep HF's names.
    """

    module: nn.Module

    def _inputs(self, input_ids: jax.Array) -> dict[str, jax.Array]:
        return {"input_ids": input_ids, "attention_mask": (input_ids != PAD).astype(jnp.int32)}

    def init(self, rngs: Any, input_ids: jax.Array, deterministic: bool = True) -> Any:
        return self.module.init(rngs, **self._inputs(input_ids), deterministic=deterministic)

    def apply(self, variables: Any, input_ids: jax.Array, deterministic: bool = True,
              rngs: Any = None) -> jax.Array:
        return self.module.apply(variables, **self._inputs(input_ids), deterministic=deterministic,
                                 rngs=rngs)


def _transform(record: Mapping[str, Any], vocab_size: int, max_length: int) -> dict[str, np.ndarray]:
    return {"input_ids": encode(record["text"], vocab_size, max_length),
            "label": np.int32(record["label"])}


def _splits(config: Any) -> dict[str, Split]:
    builder = imdb_builder.prepare(data.resolve_data_dir(config.data.data_dir))
    train_source = builder.as_data_source(split="train")
    test_source = builder.as_data_source(split="test")
    train_indices, val_indices = data.split_indices(len(train_source), float(config.data.val_fraction),
                                                    seed=_VAL_SEED)
    train, val = data.Subset(train_source, train_indices), data.Subset(train_source, val_indices)
    return {"train": Split(train, train.indices), "val": Split(val, val.indices),
            "test": Split(test_source, np.arange(len(test_source), dtype=np.int64))}


def build(config: Any, artifacts: Mapping[str, Any] | None = None) -> ClassifierTask:
    """Builds the BERT IMDB task; the dataset is prepared only when batches are first needed.

    Args:
        config: an `ml_collections.ConfigDict` with the fields listed in the module docstring.
        artifacts: the run's artifacts (`{"hf_config": ...}`) to rebuild its model, or None.

    Returns:
        A `jaxckpt.Task` whose batches hold `input_ids` (int32 `[B, max_length]`) and `label`, and
        whose artifacts are `{"hf_config": config.json of the model}`.

    Raises:
        ValueError: for another `data.target`, a non-BERT config, or `max_length` beyond the
            model's positions.

    Example:
        >>> task = build(get_config())  # experiments/configs/bert_imdb.py
    """
    if config.data.target != TARGET:
        raise ValueError(f"config.data.target={config.data.target!r}; IMDB has only {TARGET!r} (neg / pos).")
    hf_config = hf_models.task_config(config, artifacts, "BertForSequenceClassification", CLASS_NAMES)
    if hf_config.get("model_type") != "bert":
        raise ValueError(f"The model's HF config has model_type {hf_config.get('model_type')!r}; this "
                         "task finetunes a BERT-family encoder (model_type 'bert').")
    max_length = int(config.data.max_length)
    if not 1 < max_length <= hf_config["max_position_embeddings"]:
        raise ValueError(f"config.data.max_length={max_length} must be in 2..{hf_config['max_position_embeddings']} "
                         "(the model's max_position_embeddings).")
    vocab_size = int(hf_config["vocab_size"])
    return ClassifierTask(
        model=PaddedText(hf_models.build(hf_config)),
        class_names=CLASS_NAMES,
        input_key="input_ids",
        example_input=np.zeros((1, max_length), np.int32),
        splits=functools.partial(_splits, config),
        transform=functools.partial(_transform, vocab_size=vocab_size, max_length=max_length),
        artifacts={"hf_config": hf_config},
    )
