"""Where a run starts from, decided once and logged in one line.

Precedence: the workdir's own checkpoint (auto-resume) > `checkpoint.resume_file` (a full state
to continue from) > `checkpoint.pretrained` (weights only, through `graft`, fresh optimizer at step 0)
> scratch. The pretrained graft applies only on a fresh start, never on resume.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from jaxckpt import config_strings
from jaxckpt.checkpoint.manager import CheckpointManager
from jaxckpt.errors import (
    CheckpointCorruptError,
    CheckpointNotFoundError,
    CorruptCheckpointsError,
    UserError,
    WorkdirError,
)
from jaxckpt.grafting.structure import parse_structure
from jaxckpt.runner import distributed
from jaxckpt.runner.config_diff import config_changes
from jaxckpt.runner.logs import log
from jaxckpt.runner.metrics_jsonl import truncate_after
from jaxckpt.runner.rundir import set_aside, write_json
from jaxckpt.runner.task import Task
from jaxckpt.train.state import TrainState
from jaxckpt.tree import treepath
from jaxckpt.weights.foreign import is_foreign
from jaxckpt.weights.pretrained import load_params, resolve_checkpoint_path
from jaxckpt.weights.tensor_files import refuse_url


@dataclasses.dataclass(frozen=True)
class Start:
    """The decided starting point of a run.

    Attributes:
      kind: "resume" (this workdir), "resume_file", "pretrained" or "scratch".
      reason: why, for the log.
      manager: the manager of the checkpoint directory to restore from (resume / resume_file).
      step: the step to restore (resume / resume_file).
      extra: the JSON items saved with that step (config, data position, loop state, artifacts).
      path: the user's path for resume_file / pretrained.
    """

    kind: str
    reason: str
    manager: CheckpointManager | None = None
    step: int | None = None
    extra: dict[str, Any] | None = None
    path: str | None = None

    @property
    def artifacts(self) -> dict[str, Any] | None:
        return (self.extra or {}).get("task_artifacts") or None


def _pick_step(manager: CheckpointManager, best: bool, where: str, criteria: str) -> int:
    if best:
        step = manager.best_step()
        if step is None:
            raise UserError(
                f"checkpoint.resume_best=True but no checkpoint in {where} has a finite {criteria!r} "
                f"(steps: {manager.all_steps()}). Set checkpoint.resume_best=False to use the latest.")
        return step
    return manager.latest_step()


def _intact_step(manager: CheckpointManager, best: bool, where: Path, criteria: str) -> int | None:
    """The step to resume from, after checking its arrays; proven-corrupt candidates are moved aside.

    Each candidate (latest, or best) is read in full and compared with the checksums saved
    with it. One proven corrupt (`CheckpointCorruptError`) is logged as a warning and moved to
    `checkpoints/corrupt/<step>` (never deleted; a read-only manager moves nothing), and the next
    candidate is tried, so a run killed while its disk was failing resumes from the newest step
    that is still whole. A failed read that proves nothing (`CheckpointReadError`) is raised: no
    step is moved for it. With several processes a step is moved only when every process found it
    corrupt; a disagreement is an error that moves nothing.

    Returns:
      The step, or None if every step was corrupt.
    """
    candidates = manager.candidates("best" if best else "latest")
    if best and not candidates and manager.all_steps():
        _pick_step(manager, best, where, criteria)  # raises, saying why no step ranks
    for step in candidates:
        try:
            manager.verify(step)
            error = None
        except CheckpointCorruptError as e:
            error = e
        # Several processes move a step aside only when every one of them found it corrupt: a read
        # that failed on one host (a flaky mount) is no proof, and a lone move would split the job.
        if distributed.all_processes(error is None):
            return step
        if not distributed.all_processes(error is not None):
            seen = "read it intact" if error is None else f"found it corrupt ({error})"
            raise CorruptCheckpointsError(
                f"processes disagree about step {step} in {manager.directory}: process {jax.process_index()} "
                f"{seen}, another did not, so nothing was moved. Check that every host sees the same "
                "checkpoint directory (a stale or flaky mount?) and rerun.")
        if distributed.any_process(manager.read_only):  # (only process 0 holds the lock: all leave it)
            log.warning("checkpoint step %d is corrupt (left in place: this process does not hold the "
                        "workdir lock); falling back to the previous intact step. %s", step, error)
            continue
        moved = _quarantine(manager, step)
        log.warning("checkpoint step %d is corrupt and was moved to %s (not deleted); falling back to "
                    "the previous intact step. %s", step, moved, error)
    return None


def _quarantine(manager: CheckpointManager, step: int) -> Path:
    """Moves a corrupt step aside on process 0; the other processes wait for the move, then re-list."""
    if jax.process_count() == 1:
        return manager.quarantine(step)
    moved = manager.quarantine(step) if jax.process_index() == 0 else None
    multihost_utils.sync_global_devices(f"jaxckpt quarantine {step}")
    if moved is None:
        manager.reload()
    return moved or manager.directory / "corrupt" / str(step)


def decide_start(config: Any, workdir: Path, manager: CheckpointManager | None, *, training: bool) -> Start:
    """Applies the precedence rules and checks the chosen checkpoint's arrays against their checksums.

    Resuming from this workdir falls back past corrupt steps (each moved to `checkpoints/corrupt/`
    with a warning); a corrupt `checkpoint.resume_file` is an error. Checking reads the step once
    (about the cost of a restore), so `load_start` restores it without checking again.

    Args:
      config: the experiment config.
      workdir: the run directory.
      manager: the manager of `workdir/checkpoints` (None if it has none).
      training: True for train runs; False for val/test/predict, which need a trained model.

    Returns:
      The `Start`.

    Raises:
      UserError: if val/test/predict have no model, `resume=False` would mix a new run with the
        checkpoints already in the workdir, or the checkpoint to start from is corrupt.
    """
    ck = config.checkpoint
    criteria = config.early_stop.criteria
    own = manager.all_steps() if manager is not None else []
    if own and ck.resume:
        step = _intact_step(manager, ck.resume_best, workdir, criteria)
        if step is None:
            where = "left in place" if manager.read_only else f"moved to {manager.directory / 'corrupt'} (not deleted)"
            raise CorruptCheckpointsError(
                f"every checkpoint in {manager.directory} ({own}) is corrupt; they were {where}. Rerun to "
                "start over in this workdir, or restore them from a backup.")
        which = "best" if ck.resume_best else "latest"
        others = " (checkpoint.resume_file/pretrained are ignored on resume)" if ck.resume_file or ck.pretrained else ""
        return Start("resume", f"resuming from this workdir's {which} checkpoint, step {step}{others}",
                     manager=manager, step=step, extra=manager.restore_extra(step))
    if own and training:
        raise WorkdirError(
            f"{workdir} already holds checkpoints {own} but checkpoint.resume=False. Starting over here "
            "would mix two runs: pass a new --workdir, or move its checkpoints/ away.")
    if ck.resume_file:
        checkpoint_dir, step = resolve_checkpoint_path(resolve_ref(ck.resume_file), key="checkpoint.resume_file")
        # Ranked by the rule its steps record (format 2 on), else by this config's.
        source = CheckpointManager(checkpoint_dir, read_only=True)
        if source.policy.best_metric is None and criteria:
            source = CheckpointManager(checkpoint_dir, read_only=True, best_metric=criteria,
                                       best_mode="min" if config.early_stop.minimize else "max")
        if step is None:
            step = _pick_step(source, ck.resume_best, ck.resume_file, criteria)
        try:
            source.verify(step)
        except CheckpointCorruptError as e:
            raise CorruptCheckpointsError(
                f"checkpoint.resume_file={ck.resume_file}: {e} Point checkpoint.resume_file at another "
                f"step directory (steps there: {source.all_steps()}).") from None
        ignored = f" (checkpoint.pretrained={ck.pretrained} is ignored: resume_file wins)" if ck.pretrained else ""
        what = "the full state" if training else "the params"
        return Start("resume_file", f"loading {what} of step {step} from checkpoint.resume_file="
                     f"{ck.resume_file}{ignored}", manager=source, step=step, extra=source.restore_extra(step),
                     path=ck.resume_file)
    if not training:
        raise UserError(
            f"nothing to {config.run_type}: {workdir} has no checkpoint. Train in this workdir first, or "
            "set checkpoint.resume_file to a run directory, step directory or zoo:NAME.")
    if ck.pretrained:
        return Start("pretrained", f"fresh start with weights from checkpoint.pretrained={ck.pretrained} "
                     f"(strict={ck.strict}, mapping={ck.mapping or 'whole tree'}, skip={ck.skip or 'none'})",
                     path=ck.pretrained)
    return Start("scratch", "fresh start from random initialisation (no checkpoint in the workdir, "
                 "no resume_file, no pretrained)")


# Fields that steer a run but never change the shapes of its state; left out when explaining a mismatch.
_RUN_CONTROL = ("run_type", "seed", "train.", "eval.", "early_stop.", "checkpoint.", "mesh.")


def _shape_changes(saved_config: Any, config: Any, training: bool) -> list[str]:
    """Lines `key: checkpoint X vs config Y` for the config fields that may explain other shapes."""
    # Evaluation reads no optimizer state, so the optimizer cannot matter there.
    skip = _RUN_CONTROL + (() if training else ("optimizer.",))
    return [f"  {key}: checkpoint {old!r} vs config {new!r}" for key, old, new in config_changes(saved_config, config)
            if not key.startswith(skip)]


def check_same_experiment(start: Start, abstract: Mapping[str, Any], workdir: Path, config: Any, *,
                          training: bool) -> None:
    """Refuses a checkpoint whose state has other shapes than this config builds, naming what differs.

    Compares, without reading arrays, the saved step's leaves under the top-level keys of `abstract`
    (the whole state to continue training; `{"params": ...}` to evaluate) with the leaves the
    config builds, and explains a difference by the config fields that differ from the config
    saved with the step (e.g. `data.target: checkpoint 'parity' vs config 'digit'`).

    Args:
      start: the decided start; only "resume" and "resume_file" starts are checked.
      abstract: the state dict the config builds (`flax.serialization.to_state_dict` of the state).
      workdir: the run directory, for the message.
      config: the current config.
      training: whether the run continues training (then the optimizer state must match too).

    Raises:
      WorkdirError: if the workdir's own checkpoint does not match.
      UserError: if `checkpoint.resume_file` does not match.
    """
    if start.kind not in ("resume", "resume_file"):
        return
    saved = {p: tuple(m.shape) for p, m in start.manager.metadata(start.step).items()
             if p.split("/", 1)[0] in abstract}
    built = {p: tuple(np.shape(x)) for p, x in treepath.flatten(abstract).items()}
    if saved == built:
        return
    differ = sorted((p for p in set(saved) | set(built) if saved.get(p) != built.get(p)),
                    key=lambda p: (not p.startswith("params/"), p))  # the model first, then its optimizer
    lines = [f"  {p}: checkpoint {saved.get(p, 'absent')} vs config {built.get(p, 'absent')}" for p in differ[:10]]
    lines += [f"  ... and {len(differ) - 10} more"] if len(differ) > 10 else []
    changes = _shape_changes((start.extra or {}).get("config"), config, training)
    what, use = ("state", "continue") if training else ("model", "evaluate")
    if changes:
        lines += ["The config saved with that step differs in:"] + changes
        lines.append(f"Set those fields as the checkpoint has them to {use} it.")
    else:
        lines.append("Its saved config does not explain the difference (another task, or another version of the code?).")
    if start.kind == "resume":
        hint = (f" To start this experiment use a new --workdir, or to finetune from that run pass "
                f"--config.checkpoint.pretrained={workdir} in a new workdir." if training else "")
        raise WorkdirError(
            f"{workdir} holds a different experiment: its step {start.step} does not match the {what} this config "
            f"builds ({len(differ)} paths differ):\n" + "\n".join(lines) + hint)
    hint = (f" To start this model from its weights instead (a new optimizer, at step 0), pass "
            f"--config.checkpoint.pretrained={start.path}." if training else "")
    raise UserError(
        f"checkpoint.resume_file={start.path} (step {start.step}) does not match the {what} this config builds "
        f"({len(differ)} paths differ):\n" + "\n".join(lines) + hint)


def load_for_inference(start: Start, abstract_params: Any, abstract_model_state: Any = None, *,
                       tree: str = "params") -> TrainState:
    """The state val/test/predict use: the step's params (and model state), never its optimizer state.

    So a run can be evaluated under any optimizer config. `decide_start` verified the step's
    checksums already, and `check_same_experiment` its shapes.

    Args:
      start: a "resume" or "resume_file" start.
      abstract_params: the params the config builds, as `jax.ShapeDtypeStruct`s with shardings.
      abstract_model_state: the model state the task builds (e.g. batch statistics), or None.
      tree: `"params"`, or `"ema_params"` to evaluate the averaged weights (`eval.use_ema`).

    Returns:
      A `TrainState` at the step, holding the params or their average (and model state) on the
      target shardings and no optimizer state.

    Raises:
      UserError: if `tree` is the average but the step has none.
    """
    log.info("start: %s%s", start.reason, " (its averaged weights, eval.use_ema)" if tree != "params" else "")
    step_dir = start.manager.step_dir(start.step)
    try:
        params, _ = load_params(step_dir, abstract_params, tree=tree)
    except CheckpointNotFoundError as e:
        raise UserError(str(e)) from None
    model_state = None
    if abstract_model_state is not None:
        model_state, _ = load_params(step_dir, abstract_model_state, tree="model_state")
    return TrainState(step=jnp.asarray(start.step, jnp.int32), params=params, opt_state=None, rng=None,
                      model_state=model_state)


def load_start(start: Start, task: Task, config: Any, abstract: TrainState, tx: Any, mesh: Any, *,
               workdir: Path, fresh: Callable[..., TrainState]) -> tuple[TrainState, dict[str, Any], Any]:
    """Materialises the start: returns `(state, loop_state, data_state)`.

    `loop_state` holds the best-metric and early-stopping bookkeeping; `data_state` the training
    iterator position (None for a fresh iterator).
    """
    log.info("start: %s", start.reason)
    if start.kind in ("resume", "resume_file"):
        # config.json is rewritten by this run: say what changed, so nothing is lost silently.
        changes = config_changes((start.extra or {}).get("config"), config)
        if changes:
            log.info("config changes since step %d: %s", start.step,
                     ", ".join(f"{key} {old!r} -> {new!r}" for key, old, new in changes))
    loop_state = {"best_value": None, "best_step": None, "bad_evals": 0}
    if start.kind in ("resume", "resume_file"):
        # decide_start verified this step's checksums already.
        state = start.manager.restore(abstract, step=start.step, verify=False).replace(tx=tx)
        extra = start.extra or {}
        data_state = extra.get("data_state")
        if start.kind == "resume":
            loop_state = dict(extra.get("loop_state") or loop_state)
            newer = [s for s in start.manager.all_steps() if s > start.step]
            if newer and config.run_type in ("train", "train_val"):
                start.manager.wait()
                moved = set_aside(start.manager.directory, newer, workdir) if jax.process_index() == 0 else None
                if jax.process_count() > 1:  # the others must not list the steps process 0 is moving
                    multihost_utils.sync_global_devices("jaxckpt set_aside")
                start.manager.reload()
                # Their metric points go with them (truncate_after would otherwise delete them).
                points = truncate_after(workdir / "metrics.jsonl", start.step, dropped_to=moved / "metrics.jsonl") \
                    if moved is not None else 0
                log.warning("continuing from best step %d: newer steps %s and their %d metric points moved to %s "
                            "(not deleted)", start.step, newer, points, moved)
        elif (extra.get("config") or {}).get("data") != config.data.to_dict():
            data_state = None
            log.info("resume_file was trained on other data settings: starting a fresh data iterator")
        return state, loop_state, data_state
    if start.kind == "pretrained":
        fresh_params = fresh(task, config, tx, mesh).params
        params, report = load_pretrained(start.path, fresh_params, config.checkpoint, tree=weights_tree(config))
        log.info("graft report (%s):\n%s", start.path, report)
        if jax.process_index() == 0:
            write_json(workdir / "graft_report.json", report.to_dict())
        return fresh(task, config, tx, mesh, params=params), loop_state, None
    return fresh(task, config, tx, mesh), loop_state, None


def resolve_ref(path: str) -> str:
    """`zoo:NAME` -> that zoo entry's step directory; any other path unchanged."""
    if path.startswith("zoo:"):
        from jaxckpt.weights import zoo  # the zoo is only needed when a config names it

        return str(zoo.resolve(path))
    return path


def weights_tree(config: Any) -> str:
    """The checkpoint tree that evaluation, prediction and pretrained sources read (`eval.use_ema`)."""
    return "ema_params" if config.eval.get("use_ema", False) else "params"


def load_pretrained(path: str, fresh_params: Any, ck: Any, tree: str = "params") -> tuple[Any, Any]:
    """Weights-only load of `path` into `fresh_params` through `load_params`, per the checkpoint config.

    `path` is anything `jaxckpt.weights.pretrained.load_params` takes: a run, checkpoint or step directory,
    a step's `state/` item, `zoo:NAME`, a bare Orbax PyTree checkpoint, a `.safetensors` file, a
    PyTorch state dict (`.pt`/`.pth`/`.bin`) or an HF folder (`hf:DIR`). Only the arrays the graft
    loads are read. `tree` picks a jaxckpt checkpoint's `"params"` or its averaged `"ema_params"`
    (`eval.use_ema`).

    Returns:
      `(params, GraftReport)`.

    Raises:
      UserError: for a missing or corrupt source, or any graft or option error (reworded as the
        config fields that fix it).
    """
    if is_foreign(path):
        refuse_url(path, "weights files (.safetensors, .pt, .pth, .bin) are read from a local disk",
                   key="checkpoint.pretrained")
        if not Path(path).exists():
            raise UserError(f"checkpoint.pretrained={path} does not exist.")
    try:
        structure = parse_structure(getattr(ck, "structure", ""))
        return load_params(path, fresh_params, strict=ck.strict, structure=structure, tree=tree,
                           **config_strings.checkpoint_options(ck))
    except CheckpointNotFoundError as e:
        raise UserError(f"checkpoint.pretrained={path}: {e}") from e
    except CheckpointCorruptError as e:
        raise CorruptCheckpointsError(
            f"checkpoint.pretrained={path}: {e} Point checkpoint.pretrained at another step or run.") from e
    except ValueError as e:
        raise UserError(
            f"{e}\nIn a config these are --config.checkpoint.strict=False, checkpoint.mapping='src:dst,...', "
            "checkpoint.skip='regex,...', checkpoint.adapters='regex:resize,...' and checkpoint.structure="
            "'split SRC => DST1, DST2 @ AXIS; ...'; "
            f"`python -m jaxckpt plan {path} --config ...` shows the plan without training.") from e
