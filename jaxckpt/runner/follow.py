"""The follower evaluator: evaluates every checkpoint of a training run as it lands, in another process.

    python -m jaxckpt follow WORKDIR [--split val] [--config.KEY=VALUE ...]

It runs beside the trainer without taking the workdir lock, and for each newly committed step,
oldest first, exactly once:

1. pins the step (`jaxckpt.checkpoint.pins`), so retention cannot delete it mid-evaluation; a
   step already deleted, or that retention has decided to delete, is skipped with a log line;
2. evaluates the step's params (its averaged weights with `eval.use_ema`) on `split`, with the
   config saved in that step (plus the `--config` overrides), as the in-loop evaluation would;
3. writes `eval_<split>_<step>.json`, then appends the same `metrics.jsonl` point an in-loop
   evaluation writes (`{"step", "split": split, <metric>: value}`, same values), with
   `metrics.append_point` (O_APPEND, one write per line, flock'ed against the trainer's
   resume-time truncation); the trainer's own points go through its open `JsonlWriter`.

Its results drive retention: the trainer's `CheckpointManager` reads them through
`FollowerResults` (a `LateMetrics`), so a `run_type=train` run with a follower ranks its steps by
the follower's `<split>/<metric>` exactly as `train_val` ranks them by its in-loop ones. The step
is ranked once its result exists, i.e. after it was saved: while a follower is attached a step
without its result is kept (a lagging follower costs disk, never a wrong deletion), and the steps
are re-ranked at the trainer's next save.

Done means: the newest committed step's saved loop state says the run finished (its step is
`train.num_steps`, or it stopped early) and every step is evaluated or skipped. The follower then
applies retention once more (the trainer's last save came before the last results) under the
workdir lock, which the finished trainer no longer holds, and exits. Killed and restarted, it
starts at the first step without an `eval_<split>_<step>.json`; a point whose JSON was written
but whose `metrics.jsonl` line was not (killed in between) is appended then, so no point is ever
missing or written twice.

On `gs://` / `s3://` (`python -m jaxckpt follow gs://bucket/run`), a step counts once Orbax's
commit marker is in it (steps are written in place there), and pins, which need `flock`, are
not taken: a step retention deletes mid-evaluation is skipped as one deleted before its turn.
An object cannot be appended to without rewriting it, and the trainer rewrites `metrics.jsonl`
too, so there the follower writes each step's `eval_<split>_<step>.json` as it goes and appends
their `metrics.jsonl` points once the run has finished, under the workdir lock.
"""

from __future__ import annotations

import ast
import json
import math
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import ml_collections

from jaxckpt.checkpoint import pins, storage
from jaxckpt.checkpoint.manager import CheckpointManager
from jaxckpt.checkpoint.stepdir import EXTRA_ITEM, read_json_item
from jaxckpt.errors import CheckpointNotFoundError, CheckpointReadError, UserError, WorkdirError
from jaxckpt.runner import distributed, sources
from jaxckpt.runner.config import complete
from jaxckpt.runner.follow_results import FollowerResults, follower_results, result_path
from jaxckpt.runner.inference import evaluate_split
from jaxckpt.runner.object_lock import lock_for
from jaxckpt.runner.logs import log
from jaxckpt.runner.metrics_jsonl import append_point, read_metrics
from jaxckpt.runner.setup import abstract_params
from jaxckpt.runner.task import check_task, has_model_state, load_task
from jaxckpt.runner.writers import format_metrics
from jaxckpt.train.state import TrainState
from jaxckpt.train.step import make_eval_step
from jaxckpt.weights.pretrained import is_committed, load_params

__all__ = ("FollowerResults", "apply_overrides", "follow", "follower_results")

_RESERVED = ("step", "split")


def apply_overrides(config: Mapping[str, Any], overrides: Sequence[str]) -> ml_collections.ConfigDict:
    """A saved config dict with `--config.KEY=VALUE` overrides applied, locked like a config file's.

    Raises:
      UserError: for an argument that is not `--config.KEY=VALUE`, an unknown key, or a value of
        another type than the field's.
    """
    config = complete(ml_collections.ConfigDict(dict(config)))  # a step saved before a key existed gets its default
    config.lock()
    for arg in overrides:
        key, eq, text = arg.removeprefix("--config.").partition("=")
        if not arg.startswith("--config.") or not eq:
            raise UserError(f"unexpected argument {arg!r}: follow takes --config.KEY=VALUE overrides only.")
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            value = text
        node = config
        *parents, leaf = key.split(".")
        try:
            for part in parents:
                node = node[part]
            node[leaf] = value
        except (KeyError, AttributeError) as e:
            raise UserError(f"--config.{key}: no such field in the run's saved config ({e}).") from None
        except TypeError as e:
            raise UserError(f"--config.{key}={text}: {e}") from None
    return config


def committed_steps(checkpoint_dir: storage.AnyPath) -> list[int]:
    """The committed steps, oldest first (locally Orbax writes `<step>.orbax-checkpoint-tmp-*` until it
    commits; on an object store it writes `<step>/` in place and commits it with a marker)."""
    if not checkpoint_dir.is_dir():
        return []
    return sorted(int(p.name) for p in checkpoint_dir.iterdir()
                  if p.name.isdigit() and p.is_dir() and is_committed(p))


def finished(checkpoint_dir: storage.AnyPath, step: int) -> bool:
    """Whether `step`'s saved loop state says the run ended there (all steps done, or stopped early)."""
    extra = read_json_item(checkpoint_dir / str(step), EXTRA_ITEM) or {}
    config, loop_state = extra.get("config") or {}, extra.get("loop_state") or {}
    return loop_state.get("stopped_early_at") is not None or step >= int((config.get("train") or {}).get("num_steps", 0))


class _Evaluator:
    """Builds the task once per model config and evaluates steps' params like the in-loop evaluation."""

    def __init__(self, split: str, overrides: Sequence[str]):
        self._split, self._overrides = split, overrides
        self._built: dict[str, Any] = {}
        self._mesh = distributed.data_mesh()

    def __call__(self, step_dir: storage.AnyPath) -> dict[str, float]:
        extra = read_json_item(step_dir, EXTRA_ITEM) or {}
        if "config" not in extra:
            raise UserError(f"{step_dir} holds no saved config; follow evaluates steps saved by jaxckpt's loop.")
        config = apply_overrides(extra["config"], self._overrides)
        key = json.dumps([config.task, config.model.to_dict(), config.data.to_dict(), config.seed], sort_keys=True)
        if key not in self._built:
            task = load_task(config, artifacts=extra.get("task_artifacts") or None)
            check_task(task)
            if has_model_state(task):
                raise UserError(f"follow evaluates params only; {type(task).__name__} keeps a model state "
                                "(e.g. batch statistics), which it does not read yet. Evaluate with run_type=val.")
            params, _ = abstract_params(task, config, self._mesh)
            self._built = {key: (task, params, jax.jit(make_eval_step(task.metrics_fn)))}
        task, abstract, eval_step = self._built[key]
        params, _ = load_params(step_dir, abstract, tree=sources.weights_tree(config))
        state = TrainState(step=jnp.asarray(int(step_dir.name), jnp.int32), params=params, opt_state=None, rng=None)
        return evaluate_split(task, state, eval_step, self._split, config.eval.batch_size, self._mesh)


def _written_points(workdir: storage.AnyPath, split: str) -> set[int]:
    path = workdir / "metrics.jsonl"
    if not path.exists():
        return set()
    return {int(p["step"]) for p in read_metrics(path) if p.get("split") == split}


def _evaluate_unpinned(evaluate: Callable[[Any], Mapping[str, Any]], step_dir: storage.AnyPath) -> Any:
    """Evaluates a step without a pin (object stores); None if retention deleted it meanwhile."""
    try:
        return evaluate(step_dir)
    except (CheckpointNotFoundError, CheckpointReadError, FileNotFoundError):
        if is_committed(step_dir):
            raise
        return None


def follow(workdir: str | Path, *, split: str = "val", overrides: Sequence[str] = (), poll_seconds: float = 1.0,
           evaluate: Callable[[Any], Mapping[str, Any]] | None = None) -> dict[str, list[int]]:
    """Evaluates each step of a training run as it is committed, until the run has finished.

    Args:
      workdir: the training run's directory, local or a `gs://` / `s3://` URL (it may not exist
        yet: the follower waits for it).
      split: the split to evaluate (`"val"` feeds `early_stop.criteria` like `"val/loss"`).
      overrides: `--config.KEY=VALUE` arguments applied to each step's saved config
        (e.g. `--config.eval.batch_size=512`).
      poll_seconds: how often to look for new steps.
      evaluate: `step_dir -> metrics`, replacing the evaluation (tests); default: as described above.

    Returns:
      `{"evaluated": steps, "skipped": steps deleted before their turn, "deleted": steps the
      final retention pass removed}`.

    Raises:
      UserError: for a bad override, a step without a saved config, or a URL of another scheme.
    """
    workdir = storage.run_path(workdir, key="workdir")
    remote = storage.is_url(workdir)
    checkpoint_dir = workdir / "checkpoints"
    registration = None if remote else pins.attach(checkpoint_dir, split)
    try:
        evaluate = evaluate or _Evaluator(split, overrides)
        done = {int(p.name.rsplit("_", 1)[1][:-5]) for p in workdir.glob(f"eval_{split}_*.json")
                if p.name.rsplit("_", 1)[1][:-5].isdigit()}
        if not remote:  # killed between the JSON and its point (on a URL, all points come at the end)
            for step in sorted(done - _written_points(workdir, split)):
                _append(workdir, split, step, json.loads(result_path(workdir, split, step).read_text()))
        if done:
            log.info("follow %s: %d step(s) already evaluated (last %d); continuing after them", workdir,
                     len(done), max(done))
        evaluated, skipped, waiting_logged = [], [], False
        while True:
            for step in [] if remote else pins.missed(checkpoint_dir):
                if step not in done and step not in skipped:
                    log.info("follow: step %d was deleted by retention before it could be evaluated; skipped", step)
                    skipped.append(step)
            steps = committed_steps(checkpoint_dir)
            todo = [s for s in steps if s not in done and s not in skipped]
            if not todo:
                if steps and finished(checkpoint_dir, steps[-1]):
                    break
                if not waiting_logged:
                    log.info("follow %s: waiting for new checkpoints (split %s)", workdir, split)
                    waiting_logged = True
                time.sleep(poll_seconds)
                continue
            waiting_logged = False
            step = todo[0]
            if remote:
                metrics = _evaluate_unpinned(evaluate, checkpoint_dir / str(step))
            else:
                pin = pins.pin(checkpoint_dir, step)
                try:
                    metrics = None if pin is None else evaluate(checkpoint_dir / str(step))
                finally:
                    pins.unpin(pin)
            if metrics is None:
                log.info("follow: step %d was deleted by retention before it could be evaluated; skipped", step)
                skipped.append(step)
                continue
            result = {"step": step, "split": split, **dict(metrics)}
            _write_result(result_path(workdir, split, step), result)
            if not remote:
                _append(workdir, split, step, result)
            done.add(step)
            evaluated.append(step)
            log.info("follow: step %d %s %s", step, split, format_metrics(metrics))
    finally:
        pins.detach(registration)
    deferred = sorted(done - _written_points(workdir, split)) if remote else []
    deleted = _finish(workdir, split, steps[-1], deferred)
    log.info("follow %s: the run finished at step %d; evaluated %s, skipped %s, retention deleted %s",
             workdir, steps[-1], evaluated, skipped, deleted)
    return {"evaluated": evaluated, "skipped": skipped, "deleted": deleted}


def _write_result(path: storage.AnyPath, result: Mapping[str, Any]) -> None:
    """`eval_<split>_<step>.json`, written whole (as `rundir.write_json` does locally), local or on a URL."""
    text = json.dumps(result, indent=2, sort_keys=True, default=str) + "\n"
    storage.write_bytes_atomic(path, text.encode())


def _append(workdir: storage.AnyPath, split: str, step: int, result: Mapping[str, Any]) -> None:
    metrics = {k: v for k, v in result.items() if k not in _RESERVED}
    if not storage.is_url(workdir):
        append_point(workdir / "metrics.jsonl", step, split, metrics)
        return
    # Under the workdir lock only (`_finish`): the object is read, extended and written back whole.
    record = {"step": int(step), "split": str(split)}
    record.update({k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in metrics.items()})
    storage.append_line(workdir / "metrics.jsonl", json.dumps(record, allow_nan=False))


def _finish(workdir: storage.AnyPath, split: str, last: int, deferred: Sequence[int],
            wait_seconds: float = 60.0) -> list[int]:
    """Once the trainer let go of the workdir lock, and under it: appends the `metrics.jsonl` points
    deferred on an object store, and applies the run's retention with every result in."""
    extra = read_json_item(workdir / "checkpoints" / str(last), EXTRA_ITEM) or {}
    config = ml_collections.ConfigDict(extra.get("config") or {})
    results = follower_results(config, workdir) if config else None
    if results is not None and result_path(workdir, split, last).exists() and results.metrics(last) is None:
        # Its results would read as missing, and retention would rank the steps without them.
        log.warning("follow: the follower results of %s cannot be read back; retention is left to the trainer", workdir)
        results = None
    if results is None and not deferred:
        return []
    deadline = time.monotonic() + wait_seconds
    while True:  # the trainer may still be closing after its last save
        try:
            lock = lock_for(workdir).acquire()
            break
        except WorkdirError:
            if time.monotonic() > deadline:
                log.warning("follow: %s is still locked by a trainer; it applies retention at its next save%s",
                            workdir, f" (metrics.jsonl lacks the {split} points of steps {list(deferred)})"
                            if deferred else "")
                return []
            time.sleep(0.5)
    try:
        for step in deferred:
            _append(workdir, split, step, json.loads(result_path(workdir, split, step).read_text()))
        if results is None:
            return []
        ck = config.checkpoint
        manager = CheckpointManager(
            workdir / "checkpoints", max_to_keep=ck.max_to_keep, keep_best=ck.keep_best,
            best_metric=config.early_stop.criteria or None, best_mode="min" if config.early_stop.minimize else "max",
            keep_every_steps=ck.keep_every_steps or None, late_metrics=results)
        try:
            return manager.apply_retention()
        finally:
            manager.close()
    finally:
        lock.release()
