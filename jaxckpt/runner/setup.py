"""What a run builds from its config and task before step 1: the manager, the optimizer, the states."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import optax

from jaxckpt.checkpoint.manager import CheckpointManager
from jaxckpt.runner import distributed
from jaxckpt.runner.follow_results import follower_results
from jaxckpt.runner.task import has_model_state
from jaxckpt.train.optim import freeze_and_scale, make_optimizer
from jaxckpt.train.state import TrainState


def open_manager(config: Any, workdir: Path, *, read_only: bool = False) -> CheckpointManager:
    """The run's `CheckpointManager` over `workdir/checkpoints`, with the config's retention."""
    ck = config.checkpoint
    return CheckpointManager(
        workdir / "checkpoints",
        max_to_keep=ck.max_to_keep,
        keep_best=ck.keep_best,
        best_metric=config.early_stop.criteria or None,
        best_mode="min" if config.early_stop.minimize else "max",
        keep_every_steps=ck.keep_every_steps or None,
        async_save=ck.async_save,
        read_only=read_only,
        late_metrics=follower_results(config, workdir),  # a follower evaluator's results rank steps too
    )


def ema_decay(config: Any) -> float:
    """`train.ema_decay`: the decay of the params' moving average; 0 keeps none."""
    return float(config.train.get("ema_decay", 0.0))


def _init_rngs(config: Any) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The run's base key, and the keys of its params and model state (fixed functions of the seed)."""
    rng = jax.random.PRNGKey(config.seed)
    return rng, jax.random.fold_in(rng, 1), jax.random.fold_in(rng, 2)


def optimizer(config: Any, params: Any, tx: optax.GradientTransformation | None) -> optax.GradientTransformation:
    """The run's optimizer: the caller's `tx` (with `optimizer.freeze`/`lr_multipliers` over it) or the config's.

    Args:
      config: the run config.
      params: the params (arrays or abstract), for the freeze and multiplier labels.
      tx: an optax transform from the caller, or None to build `config.optimizer`.

    Returns:
      The optax transform the train step applies.
    """
    if tx is None:
        return make_optimizer(config.optimizer, params, num_steps=config.train.num_steps)
    opt = config.optimizer
    return freeze_and_scale(tx, params, freeze=opt.freeze or (), lr_multipliers=opt.lr_multipliers or ())


def abstract_params(task: Any, config: Any, mesh: Any) -> tuple[Any, Any]:
    """The task's params and model state (None without one) as abstract values on the mesh."""
    _, params_rng, state_rng = _init_rngs(config)
    replicated = distributed.replicated(mesh)
    params = distributed.abstract_like(jax.eval_shape(task.init_params, params_rng), replicated)
    model_state = None
    if has_model_state(task):
        model_state = distributed.abstract_like(jax.eval_shape(task.init_model_state, state_rng), replicated)
    return params, model_state


def abstract_state(task: Any, config: Any, mesh: Any, tx: optax.GradientTransformation | None
                   ) -> tuple[TrainState, optax.GradientTransformation]:
    """The state's abstract shape (with replicated shardings) and the optimizer, computing nothing."""
    rng, _, _ = _init_rngs(config)
    params, model_state = abstract_params(task, config, mesh)
    tx = optimizer(config, params, tx)
    ema = ema_decay(config) > 0
    abstract = jax.eval_shape(
        lambda p, m: TrainState.create(apply_fn=None, params=p, tx=tx, rng=rng, model_state=m, ema=ema), params,
        model_state)
    return distributed.abstract_like(abstract, distributed.replicated(mesh)), tx


def fresh_state(task: Any, config: Any, tx: Any, mesh: Any, params: Any = None) -> TrainState:
    """A step-0 state on the mesh: the task's initial params (or `params`), model state and optimizer state."""
    rng, params_rng, state_rng = _init_rngs(config)
    replicated = distributed.replicated(mesh)
    if params is None:
        params = jax.jit(task.init_params, out_shardings=replicated)(params_rng)
    model_state = None
    if has_model_state(task):
        model_state = jax.jit(task.init_model_state, out_shardings=replicated)(state_rng)
    ema = ema_decay(config) > 0
    create = lambda p, m: TrainState.create(apply_fn=None, params=p, tx=tx, rng=rng, model_state=m, ema=ema)
    return jax.jit(create, out_shardings=replicated)(params, model_state)
