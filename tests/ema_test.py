"""EMA weights: updated in the jitted step, saved and resumed bitwise, read by eval/export/zoo/pretrained."""

import json

import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxckpt
from jaxckpt.cli.commands import main as cli
from jaxckpt.train.ema import update_ema
from jaxckpt.train.state import TrainState
from jaxckpt.train.step import make_train_step
from jaxckpt.weights.foreign import read_foreign
from tests.runs import read_jsonl, run_cli, tiny_config, tiny_flags

EMA = {"train.ema_decay": 0.9}


def _loss(params, batch, rng):
    return jnp.mean((batch["x"] @ params["w"] - batch["y"]) ** 2), {}


def _state(ema):
    return TrainState.create(apply_fn=None, params={"w": jnp.ones((3, 1))}, tx=optax.sgd(0.1),
                             rng=jax.random.PRNGKey(0), ema=ema)


def test_the_average_is_updated_inside_the_jitted_step_with_one_trace():
    traces = []

    def loss(params, batch, rng):
        traces.append(1)
        return _loss(params, batch, rng)

    step = jax.jit(make_train_step(loss, ema_decay=0.5), donate_argnums=0)
    state = _state(ema=True)
    batch = {"x": jnp.arange(6.0).reshape(2, 3), "y": jnp.ones((2, 1))}
    expected = np.ones((3, 1), np.float32)
    for _ in range(3):
        state, _ = step(state, batch)
        expected = 0.5 * expected + 0.5 * np.asarray(state.params["w"])
    np.testing.assert_allclose(state.ema_params["w"], expected, rtol=1e-6)
    assert not np.allclose(state.ema_params["w"], state.params["w"])
    assert len(traces) == 1


def test_update_ema_keeps_each_leaf_dtype():
    out = update_ema({"w": jnp.zeros(2, jnp.bfloat16)}, {"w": jnp.ones(2, jnp.bfloat16)}, 0.75)
    assert out["w"].dtype == jnp.bfloat16 and out["w"].tolist() == [0.25, 0.25]


def test_a_state_without_the_average_serialises_as_before():
    off, on = _state(ema=False), _state(ema=True)
    assert list(flax.serialization.to_state_dict(off)) == ["step", "params", "opt_state", "rng", "model_state"]
    assert "ema_params" in flax.serialization.to_state_dict(on)
    back = flax.serialization.from_state_dict(on, flax.serialization.to_state_dict(on))
    np.testing.assert_array_equal(back.ema_params["w"], on.ema_params["w"])
    with pytest.raises(ValueError, match="ema=True"):
        flax.serialization.from_state_dict(on, flax.serialization.to_state_dict(off))


def test_ema_decay_outside_zero_one_is_refused():
    with pytest.raises(ValueError, match=r"train.ema_decay=1.0 must be in \[0, 1\)"):
        make_train_step(_loss, ema_decay=1.0)


@pytest.fixture(scope="module")
def ema_run(tmp_path_factory, data_dir):
    """A 40-step train_val run with an average, validated in the loop on the averaged weights."""
    workdir = tmp_path_factory.mktemp("ema")
    jaxckpt.run(tiny_config(data_dir, **EMA, **{"eval.use_ema": True}), workdir)
    return workdir


def _saved_state(workdir, step):
    return jaxckpt.CheckpointManager(workdir / "checkpoints", read_only=True).restore(
        _abstract(workdir, step), step=step)


def _abstract(workdir, step):
    from jaxckpt.tree import treepath

    meta = jaxckpt.CheckpointManager(workdir / "checkpoints", read_only=True).metadata(step)
    return treepath.unflatten_dict(meta)


def test_interrupted_run_ends_bitwise_where_an_uninterrupted_one_ends_average_included(tmp_path, data_dir, ema_run):
    workdir = tmp_path / "interrupted"
    config = tiny_config(data_dir, **EMA, **{"eval.use_ema": True})
    jaxckpt.run(tiny_config(data_dir, **EMA, **{"eval.use_ema": True, "train.num_steps": 20}), workdir)
    jaxckpt.run(config, workdir)
    whole, resumed = _saved_state(ema_run, 40), _saved_state(workdir, 40)
    assert set(whole) == {"step", "params", "opt_state", "rng", "ema_params"}
    flat_whole, flat_resumed = jaxckpt.flatten(whole), jaxckpt.flatten(resumed)
    assert flat_whole.keys() == flat_resumed.keys()
    for path in flat_whole:
        np.testing.assert_array_equal(flat_whole[path], flat_resumed[path], err_msg=path)
    assert read_jsonl(workdir / "metrics.jsonl") == read_jsonl(ema_run / "metrics.jsonl")


def test_use_ema_evaluates_the_average_through_run_py(tmp_path, data_dir, ema_run):
    in_loop = [p for p in read_jsonl(ema_run / "metrics.jsonl") if p["split"] == "val" and p["step"] == 40]
    flags = tiny_flags(data_dir, **EMA, **{"run_type": "val", "checkpoint.resume_file": str(ema_run)})
    done = run_cli([*flags, "--workdir", str(tmp_path / "ema"), "--config.eval.use_ema=True"], timeout=200)
    assert done.returncode == 0, done.stderr
    ema_result = json.loads((tmp_path / "ema" / "eval_val_40.json").read_text())
    # In-loop on 4 faked devices, run.py on 1: sums in another order, so equal to float precision.
    assert ema_result.pop("split") == "val" and in_loop[0].pop("split") == "val"
    assert ema_result == pytest.approx(in_loop[0], rel=1e-6)
    done = run_cli([*flags, "--workdir", str(tmp_path / "raw")], timeout=200)
    assert done.returncode == 0, done.stderr
    assert json.loads((tmp_path / "raw" / "eval_val_40.json").read_text())["loss"] != ema_result["loss"]


def test_use_ema_on_a_run_without_an_average_names_the_fix(tmp_path, data_dir):
    flags = tiny_flags(data_dir, **{"train.num_steps": 10, "checkpoint.every_steps": 10,
                                    "train.eval_every_steps": 10})
    done = run_cli([*flags, "--workdir", str(tmp_path / "run")], timeout=200)
    assert done.returncode == 0, done.stderr
    done = run_cli([*flags, "--workdir", str(tmp_path / "run"), "--config.run_type=test", "--config.eval.use_ema=True"],
                   timeout=200)
    assert done.returncode == 2
    assert "holds no 'ema_params' tree" in done.stderr and "eval.use_ema=False" in done.stderr


def test_inspect_export_zoo_and_pretrained_read_the_average(tmp_path, data_dir, ema_run, monkeypatch, capsys):
    monkeypatch.setenv("JAXCKPT_ZOO", str(tmp_path / "zoo"))
    ema = _saved_state(ema_run, 40)["ema_params"]
    assert cli(["inspect", str(ema_run)]) == 0
    assert "averaged weights: ema_params (6 arrays" in capsys.readouterr().out

    out = tmp_path / "ema.safetensors"
    assert cli(["export", str(ema_run), str(out), "--ema", "--layout", "flax"]) == 0
    assert "exported the averaged params (ema_params) of step 40" in capsys.readouterr().out
    exported = read_foreign(out)
    for path, leaf in jaxckpt.flatten(ema).items():
        np.testing.assert_array_equal(np.asarray(exported[path]), leaf, err_msg=path)

    assert cli(["zoo", "publish", str(ema_run), "digits.ema", "--ema"]) == 0
    config = tiny_config(data_dir, **{"checkpoint.pretrained": "zoo:digits.ema", "train.num_steps": 1,
                                      "run_type": "train"})
    state = jaxckpt.run(config, tmp_path / "from_zoo")
    assert json.loads((tmp_path / "from_zoo" / "graft_report.json").read_text())["source_tree"] == "ema_params"
    assert "GraftReport (source tree: ema_params)" in (tmp_path / "from_zoo" / "train.log").read_text()
    params, report = jaxckpt.load_params("zoo:digits.ema", state.params)
    assert report.source_tree == "ema_params"
    for path, leaf in jaxckpt.flatten(ema).items():
        np.testing.assert_array_equal(np.asarray(jaxckpt.flatten(params)[path]), leaf, err_msg=path)

    assert cli(["zoo", "publish", str(tmp_path / "from_zoo"), "digits.no_ema", "--ema"]) == 2
    assert "holds no averaged weights" in capsys.readouterr().err
