"""The config-driven loop: `run` dispatches to train / train_val / val / test / predict.

Where a run starts from is decided once, by `jaxckpt.runner.sources.decide_start`, and logged in one
line: the workdir's own checkpoint (auto-resume) > `checkpoint.resume_file` > `checkpoint.pretrained`
> scratch. Everything that decides the future (params, model state, optimizer state, step, rng, the
data iterator's position, best-metric and early-stopping state) is saved in each checkpoint, so a
rerun of the same command continues bitwise where the last checkpoint left off.

The loop is a library function: it logs to the `jaxckpt` logger (and, while a run lasts, to
`WORKDIR/train.log`) and changes no process-wide state; log handlers on stderr, quieter library
logs and one-line errors belong to the command line (`jaxckpt.cli.exits`).
"""

from __future__ import annotations

import contextlib
import logging
import math
import signal
import time
from pathlib import Path
from typing import Any

import flax.serialization
import jax
import numpy as np
import optax

from jaxckpt.checkpoint.manager import CheckpointManager
from jaxckpt.checkpoint import storage
from jaxckpt.errors import (CheckpointSaveError, NonFiniteLossError, Preempted, SaveFailedError, UserError,
                            WorkdirError, is_user_error)
from jaxckpt.runner import distributed, early_stop, object_lock, sources
from jaxckpt.runner import mesh as mesh_lib
from jaxckpt.runner.config import complete
from jaxckpt.runner.curves import plot_curves
from jaxckpt.runner.inference import evaluate, evaluate_split, predict
from jaxckpt.runner.lock import holding, run_lock
from jaxckpt.runner.logs import file_handler, log
from jaxckpt.runner.metrics_jsonl import truncate_after
from jaxckpt.runner.preemption import StopRequest
from jaxckpt.runner.prefetch import Prefetcher
from jaxckpt.runner.rundir import entries, remove_bookkeeping, write_json
from jaxckpt.runner.save_clock import SaveClock
from jaxckpt.runner.setup import abstract_state, ema_decay, fresh_state, open_manager
from jaxckpt.runner.task import Task, artifacts_of, check_task, check_train_iterator, has_model_state, load_task
from jaxckpt.runner.writers import format_metrics, open_writers
from jaxckpt.train.ema import EMA_KEY
from jaxckpt.train.state import TrainState
from jaxckpt.train.step import TrainStep, make_eval_step, make_train_step

RUN_TYPES = ("train", "train_val", "val", "test", "predict")

__all__ = ("RUN_TYPES", "evaluate", "predict", "run", "train_and_evaluate")


def run(config: Any, workdir: str | Path, *, task: Task | None = None,
        tx: optax.GradientTransformation | None = None, train_step: TrainStep | None = None) -> Any:
    """Runs `config.run_type` in `workdir`, holding the workdir's lock (see the module docstring).

    Args:
      config: an `ml_collections.ConfigDict` starting from `jaxckpt.default_config()`; sections or
        fields it lacks take their defaults.
      workdir: the run directory, local or `gs://` / `s3://`; created if needed.
      task: the task to run; None builds it from `config.task` (an import path).
      tx: an optax optimizer to train with instead of `config.optimizer` (whose `freeze` and
        `lr_multipliers` still apply over it).
      train_step: your own pure `train_step(state, batch) -> (state, metrics)` instead of
        `make_train_step(task.loss_fn, ...)`; the loop jits it (donating the state) and keeps
        everything else: checkpoints, resume, evaluation, logging. Its metrics must include `loss`.

    Returns:
      The final `TrainState` for train runs, the metrics dict for val/test, the predictions path for predict.

    Raises:
      UserError: for a bad config or input; the message names it and the fix.
      WorkdirError: if another process holds the workdir.
      SaveFailedError: if a checkpoint save failed (e.g. disk full); earlier checkpoints are intact.
      Preempted: after saving, when SIGTERM/SIGINT asked a train run to stop.
      Exception: whatever the task's own code raises, with its traceback.

    Example:
      >>> config = jaxckpt.default_config()
      >>> state = jaxckpt.run(config, "runs/mine", task=MyTask())  # doctest: +SKIP
    """
    config = complete(config)
    if config.run_type not in RUN_TYPES:
        raise UserError(f"config.run_type={config.run_type!r} is not one of {', '.join(RUN_TYPES)}.")
    if not config.checkpoint.lock_lease_s > 0:
        raise UserError(f"config.checkpoint.lock_lease_s={config.checkpoint.lock_lease_s} must be a positive number "
                        "of seconds (the default is 60).")
    workdir = storage.run_path(workdir, key="workdir")
    primary = jax.process_index() == 0
    before = entries(workdir)
    # Lock before touching anything: a refused second run must not write into the first one's log.
    lock = object_lock.lock_for(workdir, lease_s=config.checkpoint.lock_lease_s).acquire() if primary else None
    failed = False
    try:
        with holding(workdir, lock), _run_log(workdir, write=primary):
            if config.run_type in ("train", "train_val"):
                return train_and_evaluate(config, workdir, task=task, tx=tx, train_step=train_step)
            split = config.eval.split or ("val" if config.run_type == "val" else "test")
            if config.run_type == "predict":
                return predict(config, workdir, split=split, task=task)
            return evaluate(config, workdir, split=split, task=task)
    except CheckpointSaveError as e:
        if isinstance(e, UserError):
            raise
        raise SaveFailedError(str(e)) from e
    except Exception as e:
        failed = is_user_error(e)
        raise
    finally:
        if lock is not None:
            lock.release()
            # A config error found once the task is built leaves no new workdir with only a lock and a log.
            if failed:
                remove_bookkeeping(workdir, before)


@contextlib.contextmanager
def _run_log(workdir: storage.AnyPath, *, write: bool):
    """Copies the `jaxckpt` logger's INFO records to `WORKDIR/train.log` while the run lasts.

    On an object store the log is uploaded every few seconds, not per record (`logs.file_handler`).
    """
    if not write:
        yield
        return
    if not storage.is_url(workdir):
        workdir.mkdir(parents=True, exist_ok=True)
    handler = file_handler(workdir / "train.log")
    handler.setLevel(logging.INFO)
    old_level = log.level
    if log.getEffectiveLevel() > logging.INFO:
        log.setLevel(logging.INFO)
    log.addHandler(handler)
    try:
        yield
    finally:
        log.removeHandler(handler)
        log.setLevel(old_level)
        handler.close()


def train_and_evaluate(config: Any, workdir: str | Path, *, task: Task | None = None,
                       tx: optax.GradientTransformation | None = None,
                       train_step: TrainStep | None = None) -> TrainState:
    """Trains (and, for `run_type="train_val"`, evaluates on val) in `workdir`.

    Args:
      config: the experiment config (completed from `default_config()` where it lacks fields).
      workdir: the run directory (already locked by `run`, or call this under your own lock).
      task: the task; None builds it from `config.task`.
      tx: an optax optimizer instead of `config.optimizer` (see `run`).
      train_step: your own train step instead of the task's `loss_fn` (see `run`).

    Returns:
      The final `TrainState`.

    Raises:
      NonFiniteLossError: if the loss becomes NaN/inf.
      Preempted: after saving, when SIGTERM/SIGINT asked the run to stop.
    """
    config = complete(config)
    workdir = storage.run_path(workdir, key="workdir")
    primary = jax.process_index() == 0
    mesh = distributed.run_mesh(config)
    distributed.check_batch_size(config.train.batch_size, mesh, "train.batch_size")
    manager = open_manager(config, workdir)
    try:
        start = sources.decide_start(config, workdir, manager, training=True)
        if task is None:
            task = load_task(config, artifacts=start.artifacts)
        check_task(task)
        abstract, tx = abstract_state(task, config, mesh, tx)
        if config.run_type == "train_val":
            early_stop.check_criteria(config.early_stop.criteria, task, abstract, config.eval.batch_size)
        sources.check_same_experiment(start, flax.serialization.to_state_dict(abstract), workdir, config,
                                      training=True)
        train_iter = task.train_iterator(config.train.batch_size, config.seed)
        check_train_iterator(train_iter, task)
        state, loop_state, data_state = sources.load_start(start, task, config, abstract, tx, mesh,
                                                           workdir=workdir, fresh=fresh_state)
        if early_stop.already_stopped(config, loop_state):
            return state
        if data_state is not None:
            train_iter.set_state(data_state)
        if primary:
            write_json(workdir / "config.json", config.to_dict())
            for name, value in artifacts_of(task).items():
                write_json(workdir / f"{name}.json", value)
        return _train(config, workdir, task, manager, mesh, state.replace(tx=tx), loop_state, train_iter, train_step)
    finally:
        manager.close()


def _train(config: Any, workdir: storage.AnyPath, task: Task, manager: CheckpointManager, mesh: Any, state: TrainState,
           loop_state: dict[str, Any], train_iter: Any, custom_step: TrainStep | None) -> TrainState:
    primary = jax.process_index() == 0
    num_steps = config.train.num_steps
    validate = config.run_type == "train_val"
    start_step = int(state.step)
    if primary:
        truncate_after(workdir / "metrics.jsonl", start_step)
    writers = open_writers(workdir, purge_step=start_step + 1) if primary else None

    with_state = has_model_state(task)
    # The state keeps its shardings step after step (one compile; saves write what was restored).
    state_shardings = jax.tree.map(lambda x: x.sharding, state)
    step_fn = custom_step or make_train_step(task.loss_fn, grad_accum_steps=config.train.grad_accum_steps,
                                             model_state=with_state, ema_decay=ema_decay(config))
    train_step = jax.jit(step_fn, donate_argnums=0, out_shardings=(state_shardings, distributed.replicated(mesh)))
    eval_step = jax.jit(make_eval_step(task.metrics_fn, model_state=with_state))
    criteria = config.early_stop.criteria
    patience = config.early_stop.patience
    artifacts = artifacts_of(task)
    use_ema = sources.weights_tree(config) == EMA_KEY
    if validate and use_ema and state.ema_params is None:
        raise UserError("eval.use_ema=True validates the averaged weights, but train.ema_decay=0 keeps none: "
                        "set train.ema_decay (e.g. 0.999) or eval.use_ema=False.")

    # Train metrics are averaged over each logging window; a checkpoint in mid-window carries the
    # window's per-step values so a resumed run logs exactly what an uninterrupted one would.
    pending: list[dict[str, Any]] = list(loop_state.pop("pending_train", []))
    data_state = train_iter.get_state()

    def save(step: int, metrics: dict[str, float] | None) -> None:
        host_pending = jax.device_get(pending)
        pending[:] = host_pending
        _check_finite(_mean_of_steps(host_pending[-1:]) if host_pending else {"loss": 0.0}, step, manager)
        extra = {
            "config": config.to_dict(),
            "data_state": data_state,
            "loop_state": {**loop_state, "pending_train": [{k: float(v) for k, v in m.items()} for m in host_pending]},
            "task_artifacts": artifacts,
        }
        _check_lock(workdir)
        manager.save(step, state, metrics=metrics, extra=extra)
        if writers is not None:  # TensorBoard events and metrics as durable as the checkpoint
            writers.flush()

    step = start_step
    clock = SaveClock(config.checkpoint.get("every_seconds", 0.0), config.train.log_every_steps)
    last_log = time.perf_counter()
    progress = _Progress(num_steps, step, enabled=primary)
    batches = Prefetcher(train_iter, lambda batch: distributed.shard_batch(batch, mesh),
                         depth=max(int(config.train.prefetch), 0))
    try:
        with StopRequest() as stop, progress.redirect():
            # Logged once signals are caught: a SIGTERM from here on saves a step and exits 75.
            log.info("training steps %d..%d (batch %d, %d device(s))", step + 1, num_steps,
                     config.train.batch_size, mesh.devices.size)
            if mesh.shape.get("fsdp", 1) > 1:
                log.info("mesh %s: params and optimizer state sharded along fsdp", mesh_lib.describe(mesh))
            while step < num_steps:
                batch, data_state = next(batches)
                state, metrics = train_step(state, batch)
                step += 1
                pending.append(metrics)
                progress.update()
                at_end = step == num_steps
                # Read once (a signal may land at any moment), and agreed: every process stops at this step.
                stopping = distributed.any_process(stop.requested)
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
                        progress.report(step, speed, train_metrics)
                val_metrics = None
                if validate and (step % config.train.eval_every_steps == 0 or at_end):
                    evaluated = state.replace(params=state.ema_params) if use_ema else state
                    val_metrics = evaluate_split(task, evaluated, eval_step, "val", config.eval.batch_size, mesh)
                    if primary:
                        writers.write(step, "val", val_metrics)
                        log.info("step %d val %s", step, format_metrics(val_metrics))
                    improved = early_stop.update(loop_state, val_metrics, criteria, config.early_stop.minimize, step)
                    if primary:
                        plot_curves(workdir / "metrics.jsonl", workdir / "curves.png", main_metric=_panel_metric(config))
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
                    save(step, {f"val/{k}": v for k, v in val_metrics.items()} if val_metrics else None)
                    clock.saved()
                if stopping:
                    manager.wait()
                    signum = stop.signum or signal.SIGTERM  # another process got the signal
                    log.warning("stop requested by signal %d: saved step %d", signum, step)
                    raise Preempted(step, signum)
                if stop_early:
                    log.info("early stop at step %d: %s did not improve for %d evaluations (best %.6g at step %s)",
                             step, criteria, patience + 1, loop_state["best_value"], loop_state["best_step"])
                    break
    finally:
        batches.close()
        progress.close()
        manager.wait()
        if writers is not None:
            writers.close()
            if (workdir / "metrics.jsonl").exists():
                plot_curves(workdir / "metrics.jsonl", workdir / "curves.png", main_metric=_panel_metric(config))
    log.info("done at step %d; checkpoints %s (latest %s, best %s)", step, manager.all_steps(),
             manager.latest_step(), manager.best_step())
    return state


def _check_lock(workdir: storage.AnyPath) -> None:
    """Stops the run, on every process, if `run`'s workdir lock was lost (an object lock's lease taken over).

    Called before each save, at the same step on every process, so no process is left waiting
    in a save the others skipped; a run whose lock another run took must not write over it.
    """
    lock = run_lock(workdir)
    lost: WorkdirError | None = None
    try:
        if lock is not None:
            lock.check()
    except WorkdirError as e:
        lost = e
    if distributed.any_process(lost is not None):
        raise lost or WorkdirError(f"process 0 lost the lock of workdir {workdir}; see its log. Stopped "
                                   "without saving, so the run that holds it now is not overwritten.")


def _panel_metric(config: Any) -> str | None:
    """The metric of curves.png's second panel: the early-stopping criteria unless it is the loss."""
    split, _, name = config.early_stop.criteria.partition("/")
    return name if split == "val" and name and name != "loss" else None


def _is_terminal() -> bool:
    import sys

    return sys.stderr.isatty()


class _Progress:
    """A tqdm bar on a terminal (log lines go through it), else a log line per logging window."""

    def __init__(self, total: int, initial: int, *, enabled: bool):
        self._bar = None
        if enabled and _is_terminal():
            import tqdm

            self._bar = tqdm.tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True)
        self._total = total

    def redirect(self) -> Any:
        if self._bar is None:
            return contextlib.nullcontext()
        from tqdm.contrib.logging import logging_redirect_tqdm

        return logging_redirect_tqdm(loggers=[log])

    def update(self) -> None:
        if self._bar is not None:
            self._bar.update(1)

    def report(self, step: int, speed: float, train_metrics: dict[str, float]) -> None:
        if self._bar is not None:
            self._bar.set_postfix(loss=f"{train_metrics['loss']:.4f}")
            return
        eta = (self._total - step) / max(speed, 1e-9)
        log.info("step %d/%d (%.1f step/s, ETA %.0fs) train %s", step, self._total, speed, eta,
                 format_metrics(train_metrics))

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


def _mean_of_steps(per_step: list[dict[str, Any]]) -> dict[str, float]:
    host = jax.device_get(per_step)
    return {k: float(np.mean(np.asarray([m[k] for m in host], np.float32))) for k in host[0]}


def _check_finite(train_metrics: dict[str, float], step: int, manager: CheckpointManager) -> None:
    # A finite loss with an overflowing gradient still leaves NaN params behind: check both.
    bad = {k: train_metrics[k] for k in ("loss", "grad_norm") if not math.isfinite(train_metrics.get(k, 0.0))}
    if bad:
        latest = manager.latest_step()
        where = (f"the last good checkpoint is step {latest}" if latest is not None
                 else "no checkpoint was saved before it")
        rerun = "it resumes from that checkpoint" if latest is not None else "it starts from the beginning"
        raise NonFiniteLossError(
            f"training {format_metrics(bad)} at step {step}. Stopped without saving; {where}. Lower "
            f"optimizer.learning_rate or set optimizer.grad_clip_norm, then rerun ({rerun}).")
