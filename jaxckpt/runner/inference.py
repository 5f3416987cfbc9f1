"""Evaluating and predicting with a trained run: `evaluate`, `predict` and the split pass they share.

The model comes from the workdir's own checkpoint (best with `checkpoint.resume_best`) or from
`checkpoint.resume_file`. Only the params (and the model state, for a task that keeps one) of that
step are read, never its optimizer state, so a run evaluates under any optimizer config.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import numpy as np

from jaxckpt.checkpoint import storage
from jaxckpt.errors import UserError
from jaxckpt.runner import distributed, predictions, sources
from jaxckpt.runner.config import complete
from jaxckpt.runner.lock import holds_lock
from jaxckpt.runner.logs import log
from jaxckpt.runner.rundir import write_json
from jaxckpt.runner.setup import abstract_params, open_manager
from jaxckpt.runner.task import Task, check_task, has_model_state, load_task, splits_of
from jaxckpt.runner.writers import format_metrics
from jaxckpt.train.state import TrainState
from jaxckpt.train.step import make_eval_step, make_predict_step, mean_metrics, sum_metrics


def evaluate_split(task: Task, state: TrainState, eval_step: Any, split: str, batch_size: int,
                   mesh: Any) -> dict[str, float]:
    """Example-weighted means of the task's metrics over `split` (padding excluded), plus `num_examples`.

    A task's `summarize(means)` (e.g. perplexity from the mean loss) is applied to the means.
    """
    distributed.check_batch_size(batch_size, mesh, "eval.batch_size")
    total = None
    for batch in task.eval_batches(split, batch_size):
        batch = {k: v for k, v in batch.items() if k != "id"}
        total = sum_metrics(total, eval_step(state, distributed.shard_batch(batch, mesh)))
    if total is None:
        raise UserError(f"split {split!r} of {type(task).__name__} has no batches; is it empty?")
    means = mean_metrics(distributed.to_host(total))
    summarize = getattr(task, "summarize", None)
    return dict(summarize(means)) if callable(summarize) else means


def _check_split(task: Task, split: str) -> None:
    splits = splits_of(task)
    if split not in splits:
        raise UserError(f"split {split!r} is not one of this task's splits {list(splits)}; set eval.split "
                        "(or the split argument) to one of them.")


def _load_for_inference(config: Any, workdir: storage.AnyPath, task: Task | None) -> tuple[Task, TrainState, int, Any]:
    """The task and the params-only state that val/test/predict use (see `sources.load_for_inference`).

    The workdir's checkpoints are opened read-only (nothing cleaned up or moved aside) unless this
    process holds the workdir lock, as `run` does: another run may be writing them.
    """
    mesh = distributed.run_mesh(config)
    read_only = not holds_lock(workdir)
    manager = open_manager(config, workdir, read_only=read_only) if (workdir / "checkpoints").exists() else None
    try:
        start = sources.decide_start(config, workdir, manager, training=False)
        if task is None:
            task = load_task(config, artifacts=start.artifacts)
        check_task(task)
        params, model_state = abstract_params(task, config, mesh)
        built = {"params": params} if model_state is None else {"params": params, "model_state": model_state}
        sources.check_same_experiment(start, built, workdir, config, training=False)
        state = sources.load_for_inference(start, params, model_state, tree=sources.weights_tree(config))
    finally:
        if manager is not None:
            manager.close()
    return task, state, int(state.step), mesh


def evaluate(config: Any, workdir: str | Path, *, split: str = "val", task: Task | None = None) -> dict[str, float]:
    """Evaluates a trained model on `split` and writes `eval_<split>_<step>.json`.

    Means are over examples (padding excluded), not over batches.

    Args:
      config: the experiment config (its `task`, `eval.batch_size` and `checkpoint` fields are used).
      workdir: the run directory (local, `gs://` or `s3://`); the JSON file is written there (by process 0).
      split: any evaluation split of the task, e.g. "val" or "test".
      task: the task; None builds it from `config.task`.

    Returns:
      `{"step", "split", "num_examples", <metric>: value, ...}`.

    Raises:
      UserError: if the workdir has no checkpoint and `checkpoint.resume_file` is unset, the
        checkpoint to evaluate is corrupt, or the task has no such split.
    """
    config = complete(config)
    workdir = storage.run_path(workdir, key="workdir")
    task, state, step, mesh = _load_for_inference(config, workdir, task)
    _check_split(task, split)
    eval_step = jax.jit(make_eval_step(task.metrics_fn, model_state=has_model_state(task)))
    metrics = evaluate_split(task, state, eval_step, split, config.eval.batch_size, mesh)
    result = {"step": step, "split": split, **metrics}
    if jax.process_index() == 0:
        path = workdir / f"eval_{split}_{step}.json"
        write_json(path, result)
        log.info("%s at step %d: %s -> %s", split, step, format_metrics(metrics), path)
    return result


def predict(config: Any, workdir: str | Path, *, split: str = "test", task: Task | None = None) -> storage.AnyPath:
    """Writes the task's predictions for every example of `split` to `predictions.csv` (or `.jsonl`).

    Columns are `id` and what the task's `predict_fn` returns (see `jaxckpt.Task`); a classification
    task with `class_names` gets `prediction` (the class name) and one `prob_<class>` column each.
    `predict.max_examples` caps the number of examples. The file is written to a temporary name and
    renamed (on an object store, uploaded in one PUT), so an interrupted run never leaves a partial one.

    Args:
      config: the experiment config (its `task`, `eval.batch_size` and `checkpoint` fields are used).
      workdir: the run directory (local, `gs://` or `s3://`); the file is written there (by process 0).
      split: any evaluation split of the task, e.g. "test".
      task: the task; None builds it from `config.task`.

    Returns:
      The path of the predictions file.

    Raises:
      UserError: if there is no model to predict with, the checkpoint is corrupt, the task has no
        `predict_fn`, or it has no such split.
    """
    config = complete(config)
    workdir = storage.run_path(workdir, key="workdir")
    task, state, step, mesh = _load_for_inference(config, workdir, task)
    _check_split(task, split)
    if not callable(getattr(task, "predict_fn", None)):
        raise UserError(f"{type(task).__name__} has no predict_fn, so run_type=predict has nothing to write; "
                        "give the task a predict_fn(params, batch) -> {column: [batch, ...]}.")
    distributed.check_batch_size(config.eval.batch_size, mesh, "eval.batch_size")
    predict_step = jax.jit(make_predict_step(task.predict_fn, model_state=has_model_state(task)))
    limit = int(config.predict.max_examples) or None
    writer = predictions.Writer(workdir, task) if jax.process_index() == 0 else None
    seen = 0
    for batch in task.eval_batches(split, config.eval.batch_size):
        ids, mask = np.asarray(batch["id"]), np.asarray(batch["mask"])
        # Ids reach predict_fn (e.g. to seed each example's sampling) as int32, JAX's default width.
        inputs = {**batch, "id": ids.astype(np.int32)}
        outputs = distributed.to_host(predict_step(state, distributed.shard_batch(inputs, mesh)))
        rows = np.flatnonzero(mask > 0)
        if limit is not None:
            rows = rows[: max(limit - seen, 0)]
        seen += len(rows)
        if writer is not None:
            writer.add(ids[rows], outputs, rows)
        if limit is not None and seen >= limit:
            break
    if writer is None:
        return workdir / "predictions.csv"
    path = writer.close()
    log.info("wrote %d predictions of step %d on %s to %s", seen, step, split, path)
    return path
