"""A classification task over named splits: the `jaxckpt.runner.task.Task` that digits and IMDB build.

It joins a Flax model (logits from `batch[input_key]`), the splits' data sources and a per-record
transform into the functions the loop calls. The loss is softmax cross-entropy averaged over the
batch; dropout draws from the `rng` the train step passes in, so a step's randomness is a function
of the step alone.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Iterator, Mapping, Sequence

import flax.linen as nn
import grain
import jax
import jax.numpy as jnp
import numpy as np
import optax

from experiments.tasks import data
from jaxckpt.errors import ConfigError
from jaxckpt.types import Batch, Params


@dataclasses.dataclass(frozen=True)
class Split:
    """The records of one split and the example id of each (`ids[i]` names `source[i]`)."""

    source: data.RandomAccessSource
    ids: np.ndarray


class ClassifierTask:
    """Softmax classification of `batch[input_key]` into `class_names`; satisfies `jaxckpt.runner.task.Task`.

    Example:
        >>> task = ClassifierTask(model=model, class_names=["neg", "pos"], input_key="tokens",
        ...                       example_input=np.zeros((1, 16), np.int32), splits=splits,
        ...                       transform=transform)
        >>> params = task.init_params(jax.random.key(0))
        >>> loss, aux = task.loss_fn(params, next(task.train_iterator(32, seed=0)), jax.random.key(1))
    """

    def __init__(
            self,
            *,
            model: nn.Module,
            class_names: Sequence[str],
            input_key: str,
            example_input: np.ndarray,
            splits: Mapping[str, Split] | Callable[[], Mapping[str, Split]],
            transform: data.Transform,
            artifacts: Mapping[str, Any] | None = None,
            read_options: grain.ReadOptions | None = None,
    ):
        """Creates the task.

        Args:
            model: a Flax module called as `model(inputs, deterministic=...)` returning logits.
            class_names: class names in logit order.
            input_key: the batch key holding the model input (e.g. `"image"`, `"tokens"`).
            example_input: an input of batch size 1, used only for its shape and dtype at init.
            splits: `"train"`, `"val"` and `"test"` records, or a function returning them, called
                when data is first needed (so building the task for `plan`, which only
                initialises params, prepares no dataset).
            transform: turns one record into `{input_key: ..., "label": ...}` numpy features.
            artifacts: JSON-able data the run must keep (e.g. a vocabulary); None for none.
            read_options: grain read threads and prefetch for training; None for the default.

        Raises:
            ValueError: if a split among train/val/test is missing.
        """
        self._make_splits = splits if callable(splits) else None
        self._splits = None if callable(splits) else self._checked_splits(splits)
        self.class_names = tuple(class_names)
        self.model = model
        self.input_key = input_key
        self._example_input = example_input
        self._transform = transform
        self._artifacts = dict(artifacts or {})
        self._read_options = read_options

    @staticmethod
    def _checked_splits(splits: Mapping[str, Split]) -> dict[str, Split]:
        missing = {"train", "val", "test"} - set(splits)
        if missing:
            raise ValueError(f"ClassifierTask needs splits train, val and test; missing {sorted(missing)}.")
        return dict(splits)

    def _split(self, split: str) -> Split:
        if self._splits is None:
            self._splits = self._checked_splits(self._make_splits())
        if split not in self._splits:
            raise ConfigError(f"Unknown split {split!r}; this task has {sorted(self._splits)}.")
        return self._splits[split]

    def init_params(self, rng: jax.Array) -> Params:
        """Fresh parameters: a dict with top-level keys `encoder`, `fusion`, `head`."""
        return self.model.init({"params": rng}, jnp.asarray(self._example_input), deterministic=True)["params"]

    def _logits(self, params: Params, batch: Batch, rng: jax.Array | None) -> jax.Array:
        if rng is None:
            return self.model.apply({"params": params}, batch[self.input_key], deterministic=True)
        return self.model.apply(
                {"params": params}, batch[self.input_key], deterministic=False, rngs={"dropout": rng}
        )

    def loss_fn(self, params: Params, batch: Batch, rng: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
        """Mean softmax cross-entropy with dropout on, and `{"accuracy": batch mean}`."""
        logits = self._logits(params, batch, rng)
        labels = batch["label"]
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
        accuracy = (jnp.argmax(logits, axis=-1) == labels).astype(jnp.float32).mean()
        return loss, {"accuracy": accuracy}

    def metrics_fn(self, params: Params, batch: Batch) -> dict[str, jax.Array]:
        """Per-example `loss` and `accuracy` (shape `[batch]`), dropout off."""
        logits = self._logits(params, batch, None)
        labels = batch["label"]
        return {
                "loss": optax.softmax_cross_entropy_with_integer_labels(logits, labels),
                "accuracy": (jnp.argmax(logits, axis=-1) == labels).astype(jnp.float32),
        }

    def predict_fn(self, params: Params, batch: Batch) -> jax.Array:
        """Class probabilities `[batch, len(class_names)]`, dropout off."""
        return jax.nn.softmax(self._logits(params, batch, None), axis=-1)

    def train_iterator(self, batch_size: int, seed: int) -> grain.DatasetIterator:
        """Endless shuffled training batches; `get_state()`/`set_state()` resume exactly."""
        return data.train_iterator(self._split("train").source, batch_size, seed, self._transform, self._read_options)

    def eval_batches(self, split: str, batch_size: int) -> Iterator[Batch]:
        """One ordered pass over `split`, padded to `batch_size` with `"id"` and `"mask"`."""
        chosen = self._split(split)
        return data.eval_batches(chosen.source, chosen.ids, batch_size, self._transform)

    def num_examples(self, split: str) -> int:
        """Number of real examples in `split`."""
        return len(self._split(split).source)

    def artifacts(self) -> Mapping[str, Any]:
        """JSON-able data kept with the run (a copy, so callers cannot change the task's)."""
        return dict(self._artifacts)
