"""Factories for pure step functions: train, eval and predict.

Each factory closes over user functions and returns a pure function of `(state, batch)`. The
caller jits it (the loop uses `jax.jit(train_step, donate_argnums=0)`); nothing here traces or
compiles by itself, and one input shape means one trace.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import optax

from jaxckpt.train.ema import check_decay, update_ema
from jaxckpt.train.state import TrainState
from jaxckpt.types import Batch, LossFn

TrainStep = Callable[[TrainState, Batch], tuple[TrainState, dict[str, jax.Array]]]
EvalStep = Callable[[TrainState, Batch], dict[str, jax.Array]]

COUNT = "count"
"""Key of the example count in summed eval metrics."""


def make_train_step(loss_fn: LossFn, *, grad_accum_steps: int = 1, model_state: bool = False,
                    ema_decay: float = 0.0) -> TrainStep:
    """Builds `train_step(state, batch) -> (state, metrics)` from a loss function.

    The step's randomness is `fold_in(state.rng, state.step)`, so it depends only on the step.
    With `grad_accum_steps=k` the batch's leading dimension is split into `k` micro-batches whose
    gradients are averaged (one update per call, same result as one big batch for mean losses).

    Args:
      loss_fn: `loss_fn(params, batch, rng) -> (loss, aux)` with `aux` a dict of scalar metrics.
        With `model_state=True`: `loss_fn(params, model_state, batch, rng) -> (loss, (aux,
        new_model_state))`, and the state's `model_state` is updated.
      grad_accum_steps: number of micro-batches per update (>= 1); must divide the batch size.
      model_state: whether `loss_fn` reads and updates `state.model_state` (e.g. batch norm).
      ema_decay: with a value in (0, 1), also update `state.ema_params` (the state must be created
        with `ema=True`) to `decay * ema + (1 - decay) * new_params`; 0 leaves it alone.

    Returns:
      A pure `train_step`. Its metrics are `{"loss": ..., "grad_norm": ..., **aux}`.

    Raises:
      ValueError: for `grad_accum_steps < 1` or an `ema_decay` outside [0, 1), or (at trace time)
        a batch it does not divide or an `ema_decay` for a state without `ema_params`.

    Example:
      >>> def loss_fn(params, batch, rng):
      ...   err = batch["x"] @ params["w"] - batch["y"]
      ...   return jnp.mean(err ** 2), {}
      >>> train_step = jax.jit(make_train_step(loss_fn), donate_argnums=0)
      >>> state, metrics = train_step(state, batch)  # doctest: +SKIP
    """
    if grad_accum_steps < 1:
        raise ValueError(f"grad_accum_steps must be >= 1, got {grad_accum_steps}.")
    ema_decay = check_decay(ema_decay)

    def loss_and_grads(params, model_state_in, batch, rng):
        if model_state:
            grad_fn = jax.value_and_grad(lambda p: loss_fn(p, model_state_in, batch, rng), has_aux=True)
            (loss, (aux, new_model_state)), grads = grad_fn(params)
        else:
            (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, batch, rng)
            new_model_state = model_state_in
        return loss, aux, grads, new_model_state

    def train_step(state: TrainState, batch: Batch) -> tuple[TrainState, dict[str, jax.Array]]:
        rng = state.step_rng()
        if grad_accum_steps == 1:
            loss, aux, grads, new_model_state = loss_and_grads(state.params, state.model_state, batch, rng)
        else:
            micro = jax.tree.map(lambda x: _split_micro(x, grad_accum_steps), batch)

            def accumulate(carry, inputs):
                index, micro_batch = inputs
                loss_sum, aux_sum, grad_sum, model_state_in = carry
                loss, aux, grads, new_model_state = loss_and_grads(
                    state.params, model_state_in, micro_batch, jax.random.fold_in(rng, index))
                carry = (loss_sum + loss, jax.tree.map(jnp.add, aux_sum, aux),
                         jax.tree.map(jnp.add, grad_sum, grads), new_model_state)
                return carry, None

            first = jax.tree.map(lambda x: x[0], micro)
            aux_shape = jax.eval_shape(
                lambda: loss_and_grads(state.params, state.model_state, first, rng)[1])
            zeros = lambda tree: jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), tree)
            init = (jnp.zeros((), jnp.float32), zeros(aux_shape), zeros(state.params), state.model_state)
            (loss, aux, grads, new_model_state), _ = jax.lax.scan(
                accumulate, init, (jnp.arange(grad_accum_steps), micro))
            scale = 1.0 / grad_accum_steps
            loss, aux, grads = jax.tree.map(lambda x: x * scale, (loss, aux, grads))
        new_state = state.apply_gradients(grads=grads, model_state=new_model_state)
        if ema_decay:
            if state.ema_params is None:
                raise ValueError(
                    f"make_train_step(ema_decay={ema_decay}) needs a state with an average: build it with "
                    "TrainState.create(..., ema=True).")
            new_state = new_state.replace(ema_params=update_ema(state.ema_params, new_state.params, ema_decay))
        metrics = {"loss": loss, "grad_norm": optax.global_norm(grads), **aux}
        return new_state, metrics

    return train_step


def _split_micro(x: jax.Array, k: int) -> jax.Array:
    if x.shape[0] % k:
        raise ValueError(
            f"grad_accum_steps={k} does not divide the batch size {x.shape[0]}; "
            "choose a batch size that is a multiple of grad_accum_steps.")
    return x.reshape((k, x.shape[0] // k) + x.shape[1:])


def make_eval_step(metrics_fn: Callable[..., Mapping[str, jax.Array]], *, model_state: bool = False) -> EvalStep:
    """Builds `eval_step(state, batch) -> summed metrics` from per-example metrics.

    Sums (not means) are returned, weighted by `batch["mask"]` when present (0 marks padding), with
    the example count under `"count"`, so `sum_metrics` + `mean_metrics` over any number of batches
    give exact split means (weighted by example count, never a mean of batch means).

    Args:
      metrics_fn: `metrics_fn(params, batch) -> {name: per-example values of shape [batch]}`.
        With `model_state=True`: `metrics_fn(params, model_state, batch) -> {...}`.
      model_state: whether `metrics_fn` reads `state.model_state` (e.g. batch norm evaluating with
        its running statistics, as `make_train_step(model_state=True)` keeps them). It is read,
        never updated.

    Returns:
      A pure `eval_step`.

    Example:
      >>> eval_step = jax.jit(make_eval_step(task.metrics_fn))  # doctest: +SKIP
      >>> totals = None
      >>> for batch in batches:  # doctest: +SKIP
      ...   totals = sum_metrics(totals, eval_step(state, batch))
      >>> mean_metrics(totals)  # doctest: +SKIP
      {'loss': 0.31, 'accuracy': 0.92}
    """

    def eval_step(state: TrainState, batch: Batch) -> dict[str, jax.Array]:
        if model_state:
            per_example = metrics_fn(state.params, state.model_state, batch)
        else:
            per_example = metrics_fn(state.params, batch)
        some = next(iter(per_example.values()))
        mask = batch.get("mask")
        mask = jnp.ones(some.shape[:1], jnp.float32) if mask is None else mask.astype(jnp.float32)
        sums = {}
        for name, values in per_example.items():
            if values.shape != mask.shape:
                raise ValueError(
                    f"metrics_fn returned {name!r} with shape {values.shape}; per-example metrics "
                    f"must have shape {mask.shape} (one value per example).")
            sums[name] = jnp.sum(values.astype(jnp.float32) * mask)
        sums[COUNT] = jnp.sum(mask)
        return sums

    return eval_step


def sum_metrics(total: Mapping[str, Any] | None, sums: Mapping[str, Any]) -> dict[str, Any]:
    """Adds one batch's summed metrics to a running total (`None` starts a new total).

    Args:
      total: the running total so far, or None before the first batch.
      sums: one `eval_step` result: `{name: sum over the batch, "count": examples}`.

    Returns:
      The new total, a new dict (neither argument is changed); values stay device arrays, so
      summing does not wait for the device.
    """
    if total is None:
        return dict(sums)
    return {k: total[k] + sums[k] for k in total}


def mean_metrics(total: Mapping[str, Any]) -> dict[str, float]:
    """Turns summed metrics into per-example means (host floats), plus `num_examples`.

    Args:
      total: summed metrics with the example count under `"count"` (from `sum_metrics`).

    Returns:
      `{name: sum / count, ..., "num_examples": count}` as Python floats (and an int count).

    Raises:
      ValueError: if no example was evaluated (`count` is 0).

    Example:
      >>> mean_metrics({"loss": 6.0, "count": 4.0})
      {'loss': 1.5, 'num_examples': 4}
    """
    count = float(total[COUNT])
    if count <= 0:
        raise ValueError("no examples were evaluated (count is 0); is the split empty?")
    means = {k: float(v) / count for k, v in total.items() if k != COUNT}
    means["num_examples"] = int(round(count))
    return means


def make_predict_step(
    predict_fn: Callable[..., jax.Array], *, model_state: bool = False
) -> Callable[[TrainState, Batch], jax.Array]:
    """Builds `predict_step(state, batch) -> predict_fn(state.params, batch)`.

    Args:
      predict_fn: `predict_fn(params, batch) -> outputs` (e.g. class probabilities).
        With `model_state=True`: `predict_fn(params, model_state, batch) -> outputs`.
      model_state: whether `predict_fn` reads `state.model_state` (e.g. batch-norm running
        statistics); it is read, never updated.

    Returns:
      A pure `predict_step`.

    Example:
      >>> def predict_fn(params, batch):
      ...   return jax.nn.softmax(batch["x"] @ params["w"])
      >>> predict_step = jax.jit(make_predict_step(predict_fn))
      >>> probs = predict_step(state, {"x": x})  # doctest: +SKIP
      >>> probs.argmax(-1)  # doctest: +SKIP
      Array([2, 0, 1], dtype=int32)
    """

    def predict_step(state: TrainState, batch: Batch) -> jax.Array:
        if model_state:
            return predict_fn(state.params, state.model_state, batch)
        return predict_fn(state.params, batch)

    return predict_step
