"""The contract between the config-driven loop and an application (a model, its data, its loss).

jaxckpt is model- and task-agnostic: `jaxckpt.loop` trains whatever object satisfies `Task`.
An application module (for example `experiments.tasks.digits`) exposes `build(config) -> Task`;
configs name that module in `config.task`, and `load_task(config)` imports it.
"""

from __future__ import annotations

import importlib
from typing import Any, Iterator, Mapping, Protocol, Sequence, runtime_checkable

import jax

from jaxckpt.types import Batch, Params


@runtime_checkable
class Task(Protocol):
    """What the loop needs from an application.

    Batches are dicts of numpy arrays with a leading batch dimension. Evaluation batches always
    carry `"id"` (int64 example ids) and `"mask"` (float32, 0 for padding rows), so the last,
    partial batch is padded to the full batch size and every batch has one shape (one compile).
    """

    class_names: Sequence[str]
    """Names of the output classes, in logit order (used for the predictions CSV columns)."""

    def init_params(self, rng: jax.Array) -> Params:
        """Freshly initialised parameters (a nested dict, e.g. `{"encoder": ..., "fusion": ..., "head": ...}`)."""

    def loss_fn(self, params: Params, batch: Batch, rng: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
        """Training loss (mean over the batch) and auxiliary scalar metrics (batch means, e.g. accuracy)."""

    def metrics_fn(self, params: Params, batch: Batch) -> dict[str, jax.Array]:
        """Per-example evaluation metrics, each of shape `[batch]` (e.g. `loss`, `accuracy`).

        The eval step weights them by `batch["mask"]` and sums them, so means are exact over a split.
        """

    def predict_fn(self, params: Params, batch: Batch) -> jax.Array:
        """Class probabilities of shape `[batch, len(class_names)]`."""

    def train_iterator(self, batch_size: int, seed: int) -> Any:
        """An endless, shuffled iterator of training batches whose position is checkpointable.

        The returned object supports `next()`, `get_state() -> JSON-able dict` and `set_state(state)`
        (grain's `DatasetIterator` does), so resuming continues from the exact same batch.
        """

    def eval_batches(self, split: str, batch_size: int) -> Iterator[Batch]:
        """A finite pass over `split` (`"val"` or `"test"`), padded as described above."""

    def num_examples(self, split: str) -> int:
        """Number of real (unpadded) examples in `split` (`"train"`, `"val"` or `"test"`)."""

    def artifacts(self) -> Mapping[str, Any]:
        """JSON-able data the run must keep to be self-contained (e.g. a tokenizer vocabulary).

        Saved inside every checkpoint and written to the run directory; may be empty.
        """


def load_task(config: Any, artifacts: Mapping[str, Any] | None = None) -> Task:
    """Import `config.task` (a module path such as `"experiments.tasks.digits"`) and build the task.

    Args:
        config: an `ml_collections.ConfigDict` with a `task` field naming a module that defines
            `build(config, artifacts=None) -> Task`.
        artifacts: what `Task.artifacts()` returned for the checkpoint being loaded (e.g. a saved
            vocabulary), so the task is rebuilt exactly as it was; None for a fresh run.

    Returns:
        The task built from `config`.

    Raises:
        ValueError: if the module cannot be imported or defines no `build`.
    """
    name = config.task
    try:
        module = importlib.import_module(name)
    except ImportError as e:
        raise ValueError(
            f"config.task={name!r} could not be imported ({e}). Name a module that defines "
            "build(config) -> Task, and run from the repository root so it is importable."
        ) from e
    build = getattr(module, "build", None)
    if build is None:
        raise ValueError(f"config.task={name!r} defines no build(config) function.")
    return build(config, artifacts=artifacts) if artifacts else build(config)
