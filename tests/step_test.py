import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxckpt.train.state import TrainState
from jaxckpt.train.step import make_eval_step, make_predict_step, make_train_step, mean_metrics, sum_metrics


def _state():
    params = {"w": jnp.arange(3.0), "b": jnp.zeros(())}
    return TrainState.create(apply_fn=None, params=params, tx=optax.sgd(0.1), rng=jax.random.PRNGKey(0))


def _loss_fn(params, batch, rng):
    pred = batch["x"] @ params["w"] + params["b"]
    err = pred - batch["y"]
    return jnp.mean(err**2), {"mae": jnp.mean(jnp.abs(err))}


def _batch(n=8, seed=0):
    r = np.random.default_rng(seed)
    return {"x": r.normal(size=(n, 3)).astype(np.float32), "y": r.normal(size=(n,)).astype(np.float32)}


def test_train_step_matches_manual_sgd():
    state, batch = _state(), _batch()
    new, metrics = jax.jit(make_train_step(_loss_fn))(state, batch)
    grads = jax.grad(lambda p: _loss_fn(p, batch, None)[0])(state.params)
    np.testing.assert_allclose(new.params["w"], state.params["w"] - 0.1 * grads["w"], rtol=1e-6)
    assert int(new.step) == 1
    assert set(metrics) == {"loss", "grad_norm", "mae"}


def test_one_trace_per_input_shape():
    traces = []

    def counting_loss(params, batch, rng):
        traces.append(batch["x"].shape)
        return _loss_fn(params, batch, rng)

    step = jax.jit(make_train_step(counting_loss), donate_argnums=0)
    state = _state()
    for seed in range(3):
        state, _ = step(state, _batch(8, seed))
    assert traces == [(8, 3)]
    state, _ = step(state, _batch(4))
    assert traces == [(8, 3), (4, 3)]


def test_chex_pins_one_trace():
    @chex.assert_max_traces(n=1)
    def loss(params, batch, rng):
        return _loss_fn(params, batch, rng)

    step = jax.jit(make_train_step(loss))
    state = _state()
    for seed in range(3):
        state, _ = step(state, _batch(8, seed))


def test_rng_is_fold_in_of_step():
    seen = []

    def loss(params, batch, rng):
        seen.append(rng)
        return _loss_fn(params, batch, rng)

    state = _state().replace(step=jnp.asarray(5, jnp.int32))
    make_train_step(loss)(state, _batch())
    np.testing.assert_array_equal(seen[0], jax.random.fold_in(state.rng, 5))


def test_grad_accumulation_equals_full_batch():
    state, batch = _state(), _batch(8)
    full, m1 = jax.jit(make_train_step(_loss_fn))(state, batch)
    accum, m4 = jax.jit(make_train_step(_loss_fn, grad_accum_steps=4))(state, batch)
    np.testing.assert_allclose(full.params["w"], accum.params["w"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(m1["loss"], m4["loss"], rtol=1e-5)
    assert int(accum.step) == 1


def test_grad_accumulation_errors():
    with pytest.raises(ValueError, match="grad_accum_steps"):
        make_train_step(_loss_fn, grad_accum_steps=0)
    with pytest.raises(ValueError, match="does not divide"):
        make_train_step(_loss_fn, grad_accum_steps=3)(_state(), _batch(8))


def test_model_state_is_threaded():
    def loss(params, model_state, batch, rng):
        loss, aux = _loss_fn(params, batch, rng)
        return loss, (aux, {"seen": model_state["seen"] + batch["x"].shape[0]})

    state = _state().replace(model_state={"seen": jnp.zeros((), jnp.int32)})
    step = jax.jit(make_train_step(loss, model_state=True))
    state, _ = step(state, _batch())
    state, _ = step(state, _batch())
    assert int(state.model_state["seen"]) == 16


def test_eval_metrics_are_weighted_by_examples_not_batches():
    def metrics_fn(params, batch):
        return {"value": batch["v"]}

    eval_step = jax.jit(make_eval_step(metrics_fn))
    state = _state()
    # Batch 1: 4 real examples of value 1. Batch 2: 1 real example of value 0, 3 padding rows.
    b1 = {"v": jnp.ones(4), "mask": jnp.ones(4)}
    b2 = {"v": jnp.asarray([0.0, 9.0, 9.0, 9.0]), "mask": jnp.asarray([1.0, 0.0, 0.0, 0.0])}
    total = sum_metrics(sum_metrics(None, eval_step(state, b1)), eval_step(state, b2))
    means = mean_metrics(total)
    assert means["value"] == pytest.approx(0.8)  # a mean of batch means would give 0.5
    assert means["num_examples"] == 5


def test_eval_rejects_non_per_example_metrics():
    eval_step = make_eval_step(lambda p, b: {"bad": jnp.ones(())})
    with pytest.raises(ValueError, match="per-example"):
        eval_step(_state(), {"mask": jnp.ones(4)})


def test_mean_metrics_of_empty_split_is_an_error():
    with pytest.raises(ValueError, match="no examples"):
        mean_metrics({"count": 0.0, "loss": 0.0})


def test_predict_step():
    step = jax.jit(make_predict_step(lambda p, b: b["x"] @ p["w"]))
    out = step(_state(), {"x": jnp.ones((2, 3))})
    np.testing.assert_allclose(out, [3.0, 3.0])


def _batch_norm_state():
    """A state whose model_state holds running statistics the eval/predict functions must use."""
    return _state().replace(model_state={"mean": jnp.asarray([1.0, 2.0, 3.0]), "var": jnp.asarray([4.0, 4.0, 4.0])})


def _normalise(params, model_state, x):
    return ((x - model_state["mean"]) / jnp.sqrt(model_state["var"])) @ params["w"]


def test_eval_step_reads_model_state_in_one_trace():
    @chex.assert_max_traces(n=1)
    def metrics_fn(params, model_state, batch):
        return {"out": _normalise(params, model_state, batch["x"])}

    eval_step = jax.jit(make_eval_step(metrics_fn, model_state=True))
    state = _batch_norm_state()
    x = np.asarray([[3.0, 4.0, 5.0], [1.0, 2.0, 3.0]], np.float32)  # rows normalise to (1,1,1) and 0
    for _ in range(3):
        totals = eval_step(state, {"x": x})
    # w = (0, 1, 2): the sum over the batch is 3 + 0, so the running statistics were used.
    assert float(totals["out"]) == pytest.approx(3.0) and float(totals["count"]) == 2
    # New statistics are new values, not a new trace.
    other = state.replace(model_state={"mean": jnp.zeros(3), "var": jnp.ones(3)})
    assert float(eval_step(other, {"x": x})["out"]) == pytest.approx(14.0 + 8.0)


def test_predict_step_reads_model_state_in_one_trace():
    @chex.assert_max_traces(n=1)
    def predict_fn(params, model_state, batch):
        return _normalise(params, model_state, batch["x"])

    step = jax.jit(make_predict_step(predict_fn, model_state=True))
    state = _batch_norm_state()
    x = jnp.asarray([[3.0, 4.0, 5.0]])
    for _ in range(3):
        np.testing.assert_allclose(step(state, {"x": x}), [3.0])
    other = state.replace(model_state={"mean": jnp.zeros(3), "var": jnp.ones(3)})
    np.testing.assert_allclose(step(other, {"x": x}), [14.0])
