"""The contract between the config-driven loop and an application: a model, its data, its loss.

jaxckpt is model- and task-agnostic: the loop trains any object with the methods of `Task`, for
classification, regression, language modelling or anything else with a loss. Pass one to
`jaxckpt.run(config, workdir, task=...)`, or name a module defining `build(config, artifacts=None)`
in `config.task` (the command line's way); `load_task` imports it. `check_task` validates either
before step 1.
"""

from __future__ import annotations

import importlib
from typing import Any, Iterator, Mapping, Protocol, runtime_checkable

import jax

from jaxckpt.errors import UserError
from jaxckpt.types import Batch, Params

REQUIRED = ("init_params", "loss_fn", "metrics_fn", "train_iterator", "eval_batches")
"""Methods every task has; the rest of `Task` is optional."""


@runtime_checkable
class Task(Protocol):
    """What the loop needs from an application.

    Required: `init_params`, `loss_fn`, `metrics_fn`, `train_iterator`, `eval_batches`.
    Optional (looked up with `getattr`; leave them out when they do not apply):

    * `init_model_state(rng) -> model_state`: non-trained state such as batch statistics. When a
      task has it, `loss_fn`, `metrics_fn` and `predict_fn` take `model_state` after `params`, and
      `loss_fn` returns `(loss, (aux, new_model_state))`; the loop keeps it in the `TrainState`,
      saves it with every checkpoint and evaluates with it.
    * `predict_fn(params, batch) -> {column: [batch, ...] array}`: per-example outputs for
      `run_type="predict"`, written as columns of `predictions.csv` (or `predictions.jsonl` when a
      column is not one scalar per example). A single array is the column `prediction`.
    * `format_predictions(columns) -> {column: list}`: host-side conversion of those arrays
      (e.g. token ids to text) before they are written.
    * `class_names`: with a `[batch, len(class_names)]` `predict_fn` output, predictions are written
      as the class name plus one `prob_<class>` column each (the classification CSV).
    * `splits`: the evaluation splits this task has (default `("val", "test")`).
    * `num_examples(split) -> int`, `artifacts() -> JSON-able dict` (saved with every checkpoint
      and handed back to `build` on resume), `summarize(means) -> means` (derived metrics such as
      perplexity, computed from the split means).

    Batches are dicts of numpy arrays with a leading batch dimension. Evaluation batches always
    carry `"id"` (int64 example ids) and `"mask"` (float32, 0 for padding rows), so the last,
    partial batch is padded to the full batch size and every batch has one shape (one compile).
    """

    def init_params(self, rng: jax.Array) -> Params:
        """Freshly initialised parameters (a nested dict of arrays)."""

    def loss_fn(self, params: Params, batch: Batch, rng: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
        """Training loss (mean over the batch) and auxiliary scalar metrics."""

    def metrics_fn(self, params: Params, batch: Batch) -> dict[str, jax.Array]:
        """Per-example evaluation metrics, each of shape `[batch]` (weighted by `mask` and summed)."""

    def train_iterator(self, batch_size: int, seed: int) -> Any:
        """An endless training iterator whose position is checkpointable.

        The object supports `next()`, `get_state() -> JSON-able` and `set_state(state)` (grain's
        `DatasetIterator` does), so resuming continues from the exact same batch.
        """

    def eval_batches(self, split: str, batch_size: int) -> Iterator[Batch]:
        """A finite pass over `split`, padded and masked as described above."""


def has_model_state(task: Any) -> bool:
    """Whether `task` keeps non-trained model state (it defines `init_model_state`)."""
    return callable(getattr(task, "init_model_state", None))


def splits_of(task: Any) -> tuple[str, ...]:
    """The evaluation splits of `task` (its `splits`, or `("val", "test")`)."""
    return tuple(getattr(task, "splits", None) or ("val", "test"))


def artifacts_of(task: Any) -> dict[str, Any]:
    """What `task.artifacts()` returns, or `{}` for a task without artifacts."""
    fn = getattr(task, "artifacts", None)
    return dict(fn()) if callable(fn) else {}


def check_task(task: Any) -> None:
    """Refuses, before step 1, an object that lacks what the loop will call.

    Args:
      task: the task object.

    Raises:
      UserError: naming every missing required method, and what each one must do.
    """
    missing = [name for name in REQUIRED if not callable(getattr(task, name, None))]
    if missing:
        raise UserError(
            f"{type(task).__name__} is not a jaxckpt Task: it lacks {', '.join(missing)}. A task needs "
            "init_params(rng), loss_fn(params, batch, rng) -> (loss, aux), metrics_fn(params, batch) -> "
            "{name: [batch]}, train_iterator(batch_size, seed) and eval_batches(split, batch_size); "
            "see help(jaxckpt.Task).")


def check_train_iterator(iterator: Any, task: Any) -> None:
    """Refuses a training iterator whose position cannot be saved, before any step is taken.

    Args:
      iterator: what `task.train_iterator` returned.
      task: the task, for the message.

    Raises:
      UserError: if `iterator` lacks `__next__`, `get_state` or `set_state`.
    """
    lacks = [name for name in ("__next__", "get_state", "set_state") if not callable(getattr(iterator, name, None))]
    if lacks:
        raise UserError(
            f"{type(task).__name__}.train_iterator returned a {type(iterator).__name__}, which lacks "
            f"{', '.join(lacks)}: its position could not be saved, so a resumed run would not see the same "
            "batches. Return a grain iterator (grain.MapDataset.source(records).shuffle(seed=seed).repeat()"
            ".batch(batch_size).to_iter_dataset().__iter__() or a DataLoader iterator), or any object with "
            "__next__, get_state() -> JSON-able and set_state(state).")


def load_task(config: Any, artifacts: Mapping[str, Any] | None = None) -> Task:
    """Imports `config.task` (a module path such as `"experiments.tasks.digits"`) and builds the task.

    Args:
        config: an `ml_collections.ConfigDict` whose `task` field names a module that defines
            `build(config, artifacts=None) -> Task`.
        artifacts: what `artifacts()` returned for the checkpoint being loaded (e.g. a saved
            vocabulary), so the task is rebuilt exactly as it was; None for a fresh run.

    Returns:
        The task built from `config`.

    Raises:
        UserError: if `config.task` is empty, cannot be imported or defines no `build`.
    """
    name = config.task
    if not name:
        raise UserError("config.task is empty: name a module that defines build(config) -> Task "
                        "(e.g. experiments.tasks.digits), or pass task= to jaxckpt.run.")
    try:
        module = importlib.import_module(name)
    except ModuleNotFoundError as e:
        if e.name and not name.startswith(e.name) and not e.name.startswith(name):
            raise  # the task module exists but one of its own imports failed: a bug, keep its traceback
        raise UserError(
            f"config.task={name!r} could not be imported ({e}). Name a module that defines "
            "build(config) -> Task, importable from the current directory or an installed package."
        ) from e
    build = getattr(module, "build", None)
    if build is None:
        raise UserError(f"config.task={name!r} defines no build(config) function.")
    return build(config, artifacts=artifacts) if artifacts else build(config)

