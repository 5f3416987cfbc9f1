"""The config-driven loop: `run` dispatches to train / train_val / val / test / predict.

Where a run starts from is decided once, by `jaxckpt.runner.sources.decide_start`, and logged in one
line: the workdir's own checkpoint (auto-resume) > `checkpoint.resume_file` > `checkpoint.pretrained`
> scratch. Everything that decides the future (params, optimizer state, step, rng, the data
iterator's position, best-metric and early-stopping state) is saved in each checkpoint, so a
rerun of the same command continues bitwise where the last checkpoint left off.
"""

from __future__ import annotations

import contextlib
import csv
import math
import time
from pathlib import Path
from typing import Any

import flax.serialization
import jax
import numpy as np
import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from jaxckpt.checkpoint.manager import CheckpointManager
from jaxckpt.cli.exits import USER_ERRORS, exit_code_of
from jaxckpt.errors import (
    CheckpointSaveError,
    NonFiniteLossError,
    Preempted,
    SaveFailedError,
    UserError,
)
from jaxckpt.runner import distributed, early_stop, follow, sources
from jaxckpt.runner.metrics import format_metrics, open_writers, plot_curves, truncate_after
from jaxckpt.runner.preemption import StopRequest
from jaxckpt.runner.save_clock import SaveClock
from jaxckpt.runner.task import Task, load_task
from jaxckpt.runner.workdir import (
    WorkdirLock,
    entries,
    log,
    quiet_library_logs,
    remove_bookkeeping,
    setup_logging,
    write_json,
)
from jaxckpt.train.ema import EMA_KEY
from jaxckpt.train.optim import make_optimizer
from jaxckpt.train.state import TrainState
from jaxckpt.train.step import make_eval_step, make_predict_step, make_train_step, mean_metrics, sum_metrics

RUN_TYPES = ("train", "train_val", "val", "test", "predict")


def run(config: Any, workdir: str | Path) -> Any:
    """Runs `config.run_type` in `workdir` (see the module docstring).

    Args:
      config: an `ml_collections.ConfigDict` (see `experiments/configs/digits.py` for every key).
      workdir: the run directory; created if needed.

    Returns:
      The final `TrainState` for train runs, the metrics dict for val/test, the CSV path for predict.

    Raises:
      ValueError: for an unknown `run_type` or other bad configuration.
      WorkdirError: if another process holds the workdir.
      SaveFailedError: if a checkpoint save failed (e.g. disk full); earlier checkpoints are intact.
      Preempted: after saving, when SIGTERM/SIGINT asked a train run to stop.
    """
    if config.run_type not in RUN_TYPES:
        raise ValueError(f"config.run_type={config.run_type!r} is not one of {', '.join(RUN_TYPES)}.")
    workdir = Path(workdir).expanduser().absolute()
    quiet_library_logs()
    primary = jax.process_index() == 0
    before = entries(workdir)
    # Lock before touching anything: a refused second run must not write into the first one's log.
    lock = WorkdirLock(workdir).acquire() if primary else None
    failed = False
    try:
        setup_logging(workdir, write=primary)
        if config.run_type in ("train", "train_val"):
            return train_and_evaluate(config, workdir)
        if config.run_type == "predict":
            return predict(config, workdir)
        return evaluate(config, workdir, split="val" if config.run_type == "val" else "test")
    except CheckpointSaveError as e:
        if isinstance(e, UserError):
            raise
        raise SaveFailedError(str(e)) from e
    except USER_ERRORS:
        failed = True
        raise
    finally:
        if lock is not None:
            lock.release()
            # A config error found once the task is built leaves no new workdir with only a lock and a log.
            if failed:
                remove_bookkeeping(workdir, before)


def _manager(config: Any, workdir: Path) -> CheckpointManager:
    ck = config.checkpoint
    return CheckpointManager(
        workdir / "checkpoints",
        max_to_keep=ck.max_to_keep,
        keep_best=ck.keep_best,
        best_metric=config.early_stop.criteria or None,
        best_mode="min" if config.early_stop.minimize else "max",
        keep_every_steps=ck.keep_every_steps or None,
        async_save=ck.async_save,
        late_metrics=follow.late_metrics(config, workdir),  # a follower evaluator's results rank steps too
    )


def _abstract_state(task: Task, config: Any, mesh: Any) -> tuple[TrainState, Any]:
    """The state's abstract shape (with replicated shardings) and the optimizer, without computing."""
    rng = jax.random.PRNGKey(config.seed)
    params = jax.eval_shape(task.init_params, jax.random.fold_in(rng, 1))
    tx = make_optimizer(config.optimizer, params, num_steps=config.train.num_steps)
    ema = sources.ema_decay(config) > 0
    abstract = jax.eval_shape(lambda p: TrainState.create(apply_fn=None, params=p, tx=tx, rng=rng, ema=ema), params)
    return distributed.abstract_like(abstract, distributed.replicated(mesh)), tx


def _fresh_state(task: Task, config: Any, tx: Any, mesh: Any, params: Any = None) -> TrainState:
    rng = jax.random.PRNGKey(config.seed)
    replicated = distributed.replicated(mesh)
    if params is None:
        params = jax.jit(task.init_params, out_shardings=replicated)(jax.random.fold_in(rng, 1))
    create = lambda p: TrainState.create(apply_fn=None, params=p, tx=tx, rng=rng, ema=sources.ema_decay(config) > 0)
    return jax.jit(create, out_shardings=replicated)(params)


def train_and_evaluate(config: Any, workdir: str | Path) -> TrainState:
    """Trains (and, for `run_type="train_val"`, evaluates on val) in `workdir`.

    Args:
      config: the experiment config.
      workdir: the run directory (already locked by `run`, or call this under your own lock).

    Returns:
      The final `TrainState`.

    Raises:
      NonFiniteLossError: if the loss becomes NaN/inf.
      Preempted: after saving, when SIGTERM/SIGINT asked the run to stop.
    """
    workdir = Path(workdir)
    primary = jax.process_index() == 0
    mesh = distributed.data_mesh()
    distributed.check_batch_size(config.train.batch_size, mesh, "train.batch_size")
    manager = _manager(config, workdir)
    try:
        start = sources.decide_start(config, workdir, manager, training=True)
        task = load_task(config, artifacts=start.artifacts)
        abstract, tx = _abstract_state(task, config, mesh)
        if config.run_type == "train_val":
            early_stop.check_criteria(config.early_stop.criteria, task, abstract, config.eval.batch_size)
        sources.check_same_experiment(start, flax.serialization.to_state_dict(abstract), workdir, config,
                                      training=True)
        state, loop_state, data_state = sources.load_start(start, task, config, abstract, tx, mesh,
                                                           workdir=workdir, fresh=_fresh_state)
        if early_stop.already_stopped(config, loop_state):
            return state
        if primary:
            write_json(workdir / "config.json", config.to_dict())
            for name, value in task.artifacts().items():
                write_json(workdir / f"{name}.json", value)
        return _train(config, workdir, task, manager, mesh, state, tx, loop_state, data_state)
    finally:
        manager.close()


def _train(config, workdir, task, manager, mesh, state, tx, loop_state, data_state) -> TrainState:
    primary = jax.process_index() == 0
    num_steps = config.train.num_steps
    validate = config.run_type == "train_val"
    start_step = int(state.step)
    if primary:
        truncate_after(workdir / "metrics.jsonl", start_step)
    writers = open_writers(workdir, purge_step=start_step + 1) if primary else None

    train_iter = task.train_iterator(config.train.batch_size, config.seed)
    if data_state is not None:
        train_iter.set_state(data_state)
    state = state.replace(tx=tx)
    train_step = jax.jit(make_train_step(task.loss_fn, grad_accum_steps=config.train.grad_accum_steps,
                                         ema_decay=sources.ema_decay(config)), donate_argnums=0)
    eval_step = jax.jit(make_eval_step(task.metrics_fn))
    criteria = config.early_stop.criteria
    minimize = config.early_stop.minimize
    patience = config.early_stop.patience
    use_ema = sources.weights_tree(config) == EMA_KEY
    if validate and use_ema and state.ema_params is None:
        raise UserError("eval.use_ema=True validates the averaged weights, but train.ema_decay=0 keeps none: "
                        "set train.ema_decay (e.g. 0.999) or eval.use_ema=False.")

    # Train metrics are averaged over each logging window; a checkpoint in mid-window carries the
    # window's per-step values so a resumed run logs exactly what an uninterrupted one would.
    pending: list[dict[str, Any]] = list(loop_state.pop("pending_train", []))

    def save(step: int, metrics: dict[str, float] | None) -> None:
        host_pending = jax.device_get(pending)
        pending[:] = host_pending
        _check_finite(_mean_of_steps(host_pending[-1:]) if host_pending else {"loss": 0.0}, step, manager)
        extra = {
            "config": config.to_dict(),
            "data_state": train_iter.get_state(),
            "loop_state": {**loop_state, "pending_train": [{k: float(v) for k, v in m.items()} for m in host_pending]},
            "task_artifacts": dict(task.artifacts()),
        }
        manager.save(step, state, metrics=metrics, extra=extra)

    step = start_step
    clock = SaveClock(config.checkpoint.get("every_seconds", 0.0), config.train.log_every_steps)
    last_log = time.perf_counter()
    bar = tqdm.tqdm(total=num_steps, initial=step, unit="step", dynamic_ncols=True,
                    disable=not primary or not _is_terminal())
    # On a terminal, log lines go through tqdm.write, which lifts the bar out of their way.
    redirect = logging_redirect_tqdm(loggers=[log]) if not bar.disable else contextlib.nullcontext()
    try:
        with StopRequest() as stop, redirect:
            # Logged once signals are caught: a SIGTERM from here on saves a step and exits 75.
            log.info("training steps %d..%d (batch %d, %d device(s))", step + 1, num_steps,
                     config.train.batch_size, mesh.devices.size)
            while step < num_steps:
                batch = distributed.shard_batch(next(train_iter), mesh)
                state, metrics = train_step(state, batch)
                step += 1
                pending.append(metrics)
                bar.update(1)
                at_end = step == num_steps
                stopping = stop.requested  # read once: a signal may land at any moment
                if step % config.train.log_every_steps == 0 or at_end:
                    train_metrics = _mean_of_steps(pending)
                    window = len(pending)
                    pending.clear()
                    _check_finite(train_metrics, step, manager)
                    now = time.perf_counter()
                    speed = window / max(now - last_log, 1e-9)
                    last_log = now
                    if primary:
                        writers.write(step, "train", train_metrics)
                        bar.set_postfix(loss=f"{train_metrics['loss']:.4f}")
                        if bar.disable:
                            eta = (num_steps - step) / max(speed, 1e-9)
                            log.info("step %d/%d (%.1f step/s, ETA %.0fs) train %s", step, num_steps, speed,
                                     eta, format_metrics(train_metrics))
                val_metrics = None
                if validate and (step % config.train.eval_every_steps == 0 or at_end):
                    evaluated = state.replace(params=state.ema_params) if use_ema else state
                    val_metrics = _evaluate_split(task, evaluated, eval_step, "val", config.eval.batch_size, mesh)
                    if primary:
                        writers.write(step, "val", val_metrics)
                        log.info("step %d val %s", step, format_metrics(val_metrics))
                    improved = early_stop.update(loop_state, val_metrics, criteria, minimize, step)
                    if primary:
                        plot_curves(workdir / "metrics.jsonl", workdir / "curves.png")
                else:
                    improved = False
                stop_early = patience >= 0 and loop_state["bad_evals"] > patience
                if stop_early:  # saved with the step, so a rerun knows the run is over
                    loop_state["stopped_early_at"] = step
                timed = clock.due(step)  # on every process at every step, so they decide together
                if (step % config.checkpoint.every_steps == 0 or at_end or improved or stop_early
                        or stopping or timed):
                    if timed:
                        log.info("step %d: %.1fs since the last save, saving (checkpoint.every_seconds=%g)",
                                 step, clock.elapsed(), clock.every_seconds)
                    save(step, _prefixed(val_metrics, "val") if val_metrics else None)
                    clock.saved()
                if stopping:
                    manager.wait()
                    log.warning("stop requested by signal %d: saved step %d", stop.signum, step)
                    raise Preempted(step, stop.signum)
                if stop_early:
                    log.info("early stop at step %d: %s did not improve for %d evaluations (best %.6g at step %s)",
                             step, criteria, patience + 1, loop_state["best_value"], loop_state["best_step"])
                    break
    finally:
        bar.close()
        manager.wait()
        if writers is not None:
            writers.close()
            if (workdir / "metrics.jsonl").exists():
                plot_curves(workdir / "metrics.jsonl", workdir / "curves.png")
    log.info("done at step %d; checkpoints %s (latest %s, best %s)", step, manager.all_steps(),
             manager.latest_step(), manager.best_step())
    return state


def _is_terminal() -> bool:
    import sys
    return sys.stderr.isatty()


def _prefixed(metrics: dict[str, float], split: str) -> dict[str, float]:
    return {f"{split}/{k}": v for k, v in metrics.items()}


def _mean_of_steps(per_step: list[dict[str, Any]]) -> dict[str, float]:
    host = jax.device_get(per_step)
    return {k: float(np.mean(np.asarray([m[k] for m in host], np.float32))) for k in host[0]}


def _check_finite(train_metrics: dict[str, float], step: int, manager: CheckpointManager) -> None:
    # A finite loss with an overflowing gradient still leaves NaN params behind: check both.
    bad = {k: train_metrics[k] for k in ("loss", "grad_norm") if not math.isfinite(train_metrics.get(k, 0.0))}
    if bad:
        raise NonFiniteLossError(
            f"training {format_metrics(bad)} at step {step}. Stopped without saving; the last "
            f"good checkpoint is step {manager.latest_step()}. Lower optimizer.learning_rate or set "
            "optimizer.grad_clip_norm, then rerun (it resumes from that checkpoint).")


def _evaluate_split(task: Task, state: TrainState, eval_step: Any, split: str, batch_size: int,
                    mesh: Any) -> dict[str, float]:
    distributed.check_batch_size(batch_size, mesh, "eval.batch_size")
    total = None
    for batch in task.eval_batches(split, batch_size):
        batch = {k: v for k, v in batch.items() if k != "id"}
        total = sum_metrics(total, eval_step(state, distributed.shard_batch(batch, mesh)))
    return mean_metrics(distributed.to_host(total))


def _load_for_inference(config: Any, workdir: Path) -> tuple[Task, TrainState, int, Any]:
    """The task and the params-only state that val/test/predict use (see `sources.load_for_inference`)."""
    mesh = distributed.data_mesh()
    manager = _manager(config, workdir) if (workdir / "checkpoints").exists() else None
    try:
        start = sources.decide_start(config, workdir, manager, training=False)
        task = load_task(config, artifacts=start.artifacts)
        params = jax.eval_shape(task.init_params, jax.random.fold_in(jax.random.PRNGKey(config.seed), 1))
        params = distributed.abstract_like(params, distributed.replicated(mesh))
        sources.check_same_experiment(start, {"params": params}, workdir, config, training=False)
        state = sources.load_for_inference(start, params, sources.weights_tree(config))
    finally:
        if manager is not None:
            manager.close()
    return task, state, int(state.step), mesh


def evaluate(config: Any, workdir: str | Path, *, split: str = "val") -> dict[str, float]:
    """Evaluates a trained model on `split` and writes `eval_<split>_<step>.json`.

    The model comes from the workdir's own checkpoint (best with `checkpoint.resume_best`) or from
    `checkpoint.resume_file`. Means are over examples (padding excluded), not over batches.

    Args:
      config: the experiment config (its `task`, `eval.batch_size` and `checkpoint` fields are used).
      workdir: the run directory; the JSON file is written there (by process 0).
      split: the dataset split to evaluate, e.g. "val" or "test".

    Returns:
      `{"step", "split", "num_examples", <metric>: value, ...}`.

    Raises:
      UserError: if the workdir has no checkpoint and `checkpoint.resume_file` is unset, or the
        checkpoint to evaluate is corrupt.
    """
    workdir = Path(workdir)
    task, state, step, mesh = _load_for_inference(config, workdir)
    metrics = _evaluate_split(task, state, jax.jit(make_eval_step(task.metrics_fn)), split,
                              config.eval.batch_size, mesh)
    result = {"step": step, "split": split, **metrics}
    if jax.process_index() == 0:
        path = workdir / f"eval_{split}_{step}.json"
        write_json(path, result)
        log.info("%s at step %d: %s -> %s", split, step, format_metrics(metrics), path)
    return result


def predict(config: Any, workdir: str | Path, *, split: str = "test") -> Path:
    """Writes `predictions.csv` (`id`, `prediction`, `prob_<class>`...) for every example of `split`.

    The model comes from the same place as for `evaluate`. The CSV is written to a temporary file
    and renamed, so an interrupted run never leaves a partial `predictions.csv`.

    Args:
      config: the experiment config (its `task`, `eval.batch_size` and `checkpoint` fields are used).
      workdir: the run directory; the CSV is written there (by process 0).
      split: the dataset split to predict, e.g. "test".

    Returns:
      The path of `predictions.csv`.

    Raises:
      UserError: if there is no model to predict with, or the checkpoint is corrupt.
      ValueError: if `eval.batch_size` does not divide over the devices.
    """
    workdir = Path(workdir)
    task, state, step, mesh = _load_for_inference(config, workdir)
    distributed.check_batch_size(config.eval.batch_size, mesh, "eval.batch_size")
    predict_step = jax.jit(make_predict_step(task.predict_fn))
    path = workdir / "predictions.csv"
    rows = 0
    if jax.process_index() == 0:
        tmp = path.with_suffix(".csv.tmp")
        f = open(tmp, "w", newline="")
        writer = csv.writer(f)
        writer.writerow(["id", "prediction"] + [f"prob_{c}" for c in task.class_names])
    for batch in task.eval_batches(split, config.eval.batch_size):
        ids, mask = np.asarray(batch["id"]), np.asarray(batch["mask"])
        inputs = {k: v for k, v in batch.items() if k != "id"}
        probs = distributed.to_host(predict_step(state, distributed.shard_batch(inputs, mesh)))
        if jax.process_index() == 0:
            for i in np.flatnonzero(mask > 0):
                writer.writerow([int(ids[i]), task.class_names[int(np.argmax(probs[i]))]]
                                + [f"{p:.6f}" for p in probs[i]])
                rows += 1
    if jax.process_index() == 0:
        f.close()
        tmp.replace(path)
        log.info("wrote %d predictions of step %d to %s", rows, step, path)
    return path


def run_or_exit(config: Any, workdir: str | Path) -> int:
    """`run` for command lines: returns an exit code, printing user errors without a traceback.

    Args:
      config: as for `run`.
      workdir: as for `run`.

    Returns:
      0 on success; `jaxckpt.errors.USER_ERROR_EXIT_CODE` (2) after printing a user error (bad
      config, path or input) as one line to stderr; `PREEMPTED_EXIT_CODE` (75) when a signal
      stopped a train run after saving, so a scheduler reruns it to continue.

    Raises:
      Exception: any error that is not the user's (a bug), with its traceback.

    Example:
      >>> sys.exit(run_or_exit(config, "runs/digits"))  # doctest: +SKIP
    """
    return exit_code_of(run, config, workdir)
