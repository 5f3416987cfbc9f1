"""The runner as a library: task= and tx=, the Task contract checks, default_config, errors from task code."""

import json

import grain
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxckpt
from jaxckpt.cli.exits import exit_code_of, run_or_exit
from jaxckpt.runner.config import complete


class LinearTask:
    """y = x @ w on 64 fixed examples; a val split of 16; predictions with a non-scalar column."""

    def __init__(self, fail_in_loss: bool = False):
        rng = np.random.default_rng(0)
        self.x = rng.normal(size=(80, 3)).astype(np.float32)
        self.y = self.x @ np.asarray([1.0, -2.0, 0.5], np.float32)
        self.fail_in_loss = fail_in_loss

    def init_params(self, rng):
        return {"w": jax.random.normal(rng, (3,))}

    def loss_fn(self, params, batch, rng):
        if self.fail_in_loss:
            raise ValueError("a bug in the user's loss")
        return jnp.mean((batch["x"] @ params["w"] - batch["y"]) ** 2), {}

    def metrics_fn(self, params, batch):
        return {"loss": (batch["x"] @ params["w"] - batch["y"]) ** 2}

    def predict_fn(self, params, batch):
        return {"y_hat": batch["x"] @ params["w"], "x": batch["x"]}

    def train_iterator(self, batch_size, seed):
        records = [{"x": self.x[i], "y": self.y[i]} for i in range(64)]
        return iter(grain.MapDataset.source(records).shuffle(seed=seed).repeat().batch(batch_size).to_iter_dataset())

    def eval_batches(self, split, batch_size):
        for i in range(64, 80, batch_size):
            yield {"x": self.x[i:i + batch_size], "y": self.y[i:i + batch_size],
                   "id": np.arange(i, i + batch_size), "mask": np.ones(batch_size, np.float32)}

    splits = ("val",)


def _config(**changes):
    config = jaxckpt.default_config()
    config.train.num_steps, config.train.batch_size, config.eval.batch_size = 20, 8, 8
    config.checkpoint.every_steps = config.train.eval_every_steps = 10
    config.checkpoint.async_save = False
    for key, value in changes.items():
        section, name = key.split(".")
        config[section][name] = value
    return config


def test_a_task_object_trains_evaluates_and_predicts(tmp_path):
    state = jaxckpt.run(_config(), tmp_path, task=LinearTask(), tx=optax.sgd(0.1))
    assert int(state.step) == 20
    result = jaxckpt.evaluate(_config(), tmp_path, split="val", task=LinearTask())
    assert result["loss"] < 0.1 and result["num_examples"] == 16
    path = jaxckpt.predict(_config(), tmp_path, split="val", task=LinearTask())
    assert path.name == "predictions.jsonl"  # the x column holds a vector per example
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r["id"] for r in rows] == list(range(64, 80)) and len(rows[0]["x"]) == 3


def test_tx_is_the_callers_optimizer(tmp_path):
    task = LinearTask()
    state = jaxckpt.run(_config(), tmp_path, task=task, tx=optax.sgd(0.0))
    fresh = task.init_params(jax.random.fold_in(jax.random.PRNGKey(0), 1))
    np.testing.assert_array_equal(state.params["w"], fresh["w"])  # a zero learning rate moved nothing


def test_a_generator_as_train_iterator_is_refused_before_step_one(tmp_path):
    class GeneratorTask(LinearTask):
        def train_iterator(self, batch_size, seed):
            while True:
                yield {"x": self.x[:batch_size], "y": self.y[:batch_size]}

    with pytest.raises(jaxckpt.UserError, match="lacks get_state, set_state.*grain") as e:
        jaxckpt.run(_config(), tmp_path / "run", task=GeneratorTask())
    assert "GeneratorTask.train_iterator" in str(e.value)
    assert not (tmp_path / "run").exists()  # nothing left behind


def test_an_object_that_is_not_a_task_is_refused_naming_what_it_lacks(tmp_path):
    with pytest.raises(jaxckpt.UserError, match="lacks loss_fn, metrics_fn"):
        jaxckpt.run(_config(), tmp_path, task=type("Half", (), {"init_params": lambda self, rng: {},
                                                                 "train_iterator": None, "eval_batches": None})())


def test_an_error_in_task_code_reaches_the_caller_with_its_traceback(tmp_path, capsys):
    with pytest.raises(ValueError, match="a bug in the user's loss") as e:
        jaxckpt.run(_config(), tmp_path / "a", task=LinearTask(fail_in_loss=True))
    assert not isinstance(e.value, jaxckpt.UserError)
    assert any(frame.name == "loss_fn" for frame in e.traceback)
    # The command-line wrapper does not turn it into a one-line "user error" either.
    with pytest.raises(ValueError, match="a bug in the user's loss"):
        exit_code_of(jaxckpt.run, _config(), tmp_path / "b", task=LinearTask(fail_in_loss=True))
    assert "jaxckpt: error" not in capsys.readouterr().err


def test_jaxckpts_own_errors_are_one_line_exit_2(tmp_path, capsys):
    config = _config(**{"train.batch_size": 8})
    config.run_type = "nonsense"
    assert run_or_exit(config, tmp_path) == 2
    assert capsys.readouterr().err.startswith("jaxckpt: error: config.run_type='nonsense'")


def test_a_config_without_sections_gets_the_defaults():
    import ml_collections

    config = complete(ml_collections.ConfigDict({"task": "x", "train": {"num_steps": 7}}))
    assert config.train.num_steps == 7 and config.train.batch_size == jaxckpt.default_config().train.batch_size
    assert config.checkpoint.max_to_keep == 3 and config.early_stop.criteria == "val/loss"
    with pytest.raises(jaxckpt.UserError, match="config.train must be a group of fields"):
        complete({"train": 5})


def test_default_config_documents_every_key():
    import inspect

    from jaxckpt.runner import config as config_module

    source = inspect.getsource(config_module.default_config)
    for line in source.splitlines():
        if line.strip().startswith("c.") and "=" in line:
            assert "#" in line or "ConfigDict()" in line, f"undocumented config key: {line.strip()}"


def test_a_callers_train_step_replaces_the_loss_fn_step_and_keeps_the_rest(tmp_path):
    task = LinearTask(fail_in_loss=True)  # the task's own loss_fn is never traced

    def my_step(state, batch):  # plain SGD on the squared error, written by hand
        def loss(params):
            return jnp.mean((batch["x"] @ params["w"] - batch["y"]) ** 2)

        value, grads = jax.value_and_grad(loss)(state.params)
        return state.apply_gradients(grads=grads), {"loss": value, "grad_norm": optax.global_norm(grads)}

    state = jaxckpt.run(_config(), tmp_path, task=task, tx=optax.sgd(0.1), train_step=my_step)
    assert int(state.step) == 20
    assert jaxckpt.evaluate(_config(), tmp_path, task=task)["loss"] < 0.1
    steps = sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit())
    assert steps == [10, 20]
