"""What a run builds from its config and task before step 1: the manager, the optimizer, the states."""

from __future__ import annotations

from typing import Any

import jax
import optax

from jaxckpt import config_strings
from jaxckpt.checkpoint import storage
from jaxckpt.checkpoint.manager import CheckpointManager
from jaxckpt.runner import mesh as mesh_lib
from jaxckpt.runner.follow_results import follower_results
from jaxckpt.runner.task import has_model_state
from jaxckpt.train.optim import freeze_and_scale, make_optimizer
from jaxckpt.train.state import TrainState


def open_manager(config: Any, workdir: storage.AnyPath, *, read_only: bool = False) -> CheckpointManager:
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
    """The task's params and model state (None without one) as abstract values on the mesh.

    Params are sharded as `config.mesh` says (`jaxckpt.runner.mesh.state_shardings`); the
    model state is replicated unless a rule names it.
    """
    _, params_rng, state_rng = _init_rngs(config)
    rules = config_strings.parse_mesh_rules(config.mesh.rules)
    params = jax.eval_shape(task.init_params, params_rng)
    params = mesh_lib.with_shardings(params, mesh_lib.state_shardings(params, mesh, rules, prefix="params/",
                                                                      require_match=False))
    model_state = None
    if has_model_state(task):
        model_state = jax.eval_shape(task.init_model_state, state_rng)
        model_state = mesh_lib.with_shardings(model_state, mesh_lib.state_shardings(
            model_state, mesh, rules, prefix="model_state/", require_match=False))
    return params, model_state


def abstract_state(task: Any, config: Any, mesh: Any, tx: optax.GradientTransformation | None
                   ) -> tuple[TrainState, optax.GradientTransformation]:
    """The state's abstract shape (with its shardings on the mesh) and the optimizer, computing nothing.

    Raises:
      ConfigError: for a `config.mesh.rules` entry that names no axis of the mesh, does not
        divide a leaf's shape, or matches no leaf.
    """
    params, model_state = abstract_params(task, config, mesh)
    tx = optimizer(config, params, tx)
    return _on_mesh(config, mesh, tx, params, model_state), tx


def _on_mesh(config: Any, mesh: Any, tx: optax.GradientTransformation, params: Any, model_state: Any) -> TrainState:
    """The abstract state built from abstract params with `tx`, each leaf with its sharding."""
    rng, _, _ = _init_rngs(config)
    ema = ema_decay(config) > 0
    abstract = jax.eval_shape(
        lambda p, m: TrainState.create(apply_fn=None, params=p, tx=tx, rng=rng, model_state=m, ema=ema), params,
        model_state)
    rules = config_strings.parse_mesh_rules(config.mesh.rules)
    return mesh_lib.with_shardings(abstract, mesh_lib.state_shardings(abstract, mesh, rules))


def fresh_state(task: Any, config: Any, tx: Any, mesh: Any, params: Any = None) -> TrainState:
    """A step-0 state on the mesh: the task's initial params (or `params`), model state and optimizer state.

    Each part is created directly on its shardings (`out_shardings`), never whole on one device.
    """
    rng, params_rng, state_rng = _init_rngs(config)
    shardings = jax.tree.map(lambda x: x.sharding, _on_mesh(config, mesh, tx, *abstract_params(task, config, mesh)))
    if params is None:
        params = jax.jit(task.init_params, out_shardings=shardings.params)(params_rng)
    model_state = None
    if has_model_state(task):
        model_state = jax.jit(task.init_model_state, out_shardings=shardings.model_state)(state_rng)
    ema = ema_decay(config) > 0
    create = lambda p, m: TrainState.create(apply_fn=None, params=p, tx=tx, rng=rng, model_state=m, ema=ema)
    return jax.jit(create, out_shardings=shardings)(params, model_state)
