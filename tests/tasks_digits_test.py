"""Tests for the digits task: the offline tfds builder, the grain pipelines and the model."""

import os
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from experiments.tasks import data, digits, digits_builder
from jaxckpt.runner.task import Task

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _config(data_dir, **overrides):
    config = ml_collections.ConfigDict({
            "task": "experiments.tasks.digits",
            "seed": 0,
            "data": {"target": "digit", "data_dir": str(data_dir), "val_fraction": 0.15},
            "model": {"encoder_dims": (32,), "fusion_dims": (16,), "dropout": 0.1},
    })
    for path, value in overrides.items():
        section, field = path.split(".")
        config[section][field] = value
    return config


@pytest.fixture(scope="module")
def task(data_dir):
    return digits.build(_config(data_dir))


def _shapes(tree):
    return jax.tree.map(lambda x: tuple(x.shape), tree)


def test_builder_prepares_fixed_disjoint_splits_offline(data_dir):
    sources = digits_builder.prepare(str(data_dir)).as_data_source()
    assert sorted(sources) == ["test", "train"]
    train_ids = {int(sources["train"][i]["id"]) for i in range(len(sources["train"]))}
    test_ids = {int(sources["test"][i]["id"]) for i in range(len(sources["test"]))}
    assert (len(train_ids), len(test_ids)) == (1438, 359)
    assert not train_ids & test_ids
    assert train_ids | test_ids == set(range(digits_builder.NUM_EXAMPLES))
    record = sources["test"][0]
    assert record["image"].shape == (8, 8) and record["image"].dtype == np.uint8
    assert record["image"].max() <= 16


def test_prepare_is_idempotent_and_fast_when_done(data_dir):
    digits_builder.prepare(str(data_dir))
    version_dir = data_dir / "jaxckpt_digits" / "1.0.0"
    before = {p.name: p.stat().st_mtime_ns for p in version_dir.iterdir()}
    start = time.perf_counter()
    digits_builder.prepare(str(data_dir))
    assert time.perf_counter() - start < 1.0
    assert {p.name: p.stat().st_mtime_ns for p in version_dir.iterdir()} == before


def test_concurrent_prepare_in_two_processes(tmp_path):
    script = (
            "import sys; from experiments.tasks import digits_builder; "
            "b = digits_builder.prepare(sys.argv[1]); print(len(b.as_data_source()['train']))"
    )
    procs = [
            subprocess.Popen([sys.executable, "-c", script, str(tmp_path)], cwd=REPO_ROOT,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for _ in range(2)
    ]
    outputs = [p.communicate(timeout=120) for p in procs]
    for proc, (out, err) in zip(procs, outputs):
        assert proc.returncode == 0, err
        assert out.strip().splitlines()[-1] == "1438"
    assert not [p for p in (tmp_path / "jaxckpt_digits").iterdir() if p.name.startswith("incomplete")]


def test_task_satisfies_protocol_with_fixed_split_sizes(task):
    assert isinstance(task, Task)
    assert task.class_names == tuple(str(d) for d in range(10))
    sizes = {split: task.num_examples(split) for split in ("train", "val", "test")}
    assert sizes == {"train": 1222, "val": 216, "test": 359}
    assert task.artifacts() == {}


def test_val_fraction_changes_only_the_val_split(data_dir, task):
    other = digits.build(_config(data_dir, **{"data.val_fraction": 0.25}))
    assert other.num_examples("val") == round(0.25 * 1438)
    test_ids = lambda t: np.concatenate([b["id"][b["mask"] > 0] for b in t.eval_batches("test", 128)])
    np.testing.assert_array_equal(test_ids(task), test_ids(other))


def test_eval_passes_cover_every_example_once(task):
    seen = []
    for split in ("train", "val", "test"):
        ids = np.concatenate([b["id"][b["mask"] > 0] for b in task.eval_batches(split, 100)])
        assert len(ids) == len(set(ids.tolist())) == task.num_examples(split)
        seen.extend(ids.tolist())
    assert sorted(seen) == list(range(digits_builder.NUM_EXAMPLES))


def test_last_eval_batch_is_padded_and_masked(task):
    batches = list(task.eval_batches("test", 100))
    assert len(batches) == 4
    for batch in batches:
        assert {k: v.shape[0] for k, v in batch.items()} == {"image": 100, "label": 100, "id": 100, "mask": 100}
        assert batch["mask"].dtype == np.float32 and batch["id"].dtype == np.int64
    last = batches[-1]
    np.testing.assert_array_equal(last["mask"], np.r_[np.ones(59), np.zeros(41)].astype(np.float32))
    assert (last["id"][59:] == -1).all() and (last["id"][:59] >= 0).all()
    assert not last["image"][59:].any()


def test_eval_order_is_deterministic(task):
    first = [b["id"] for b in task.eval_batches("val", 64)]
    second = [b["id"] for b in task.eval_batches("val", 64)]
    np.testing.assert_array_equal(np.concatenate(first), np.concatenate(second))


def test_train_batches_have_fixed_shapes_and_scaled_pixels(task):
    batch = next(task.train_iterator(32, seed=0))
    assert batch["image"].shape == (32, 8, 8) and batch["image"].dtype == np.float32
    assert batch["label"].shape == (32,) and batch["label"].dtype == np.int32
    assert 0.0 <= batch["image"].min() and batch["image"].max() <= 1.0


def test_train_iterator_resumes_exactly_from_its_state(task):
    iterator = task.train_iterator(64, seed=3)
    for _ in range(5):
        next(iterator)
    state = iterator.get_state()
    expected = [next(iterator) for _ in range(3)]

    resumed = task.train_iterator(64, seed=3)
    resumed.set_state(state)
    for want in expected:
        got = next(resumed)
        for key in want:
            np.testing.assert_array_equal(got[key], want[key])


def test_train_order_depends_on_seed_and_epoch(task):
    labels = lambda seed: next(task.train_iterator(64, seed=seed))["label"]
    np.testing.assert_array_equal(labels(0), labels(0))
    assert not np.array_equal(labels(0), labels(1))
    # 1222 examples in batches of 611: batches 0 and 2 hold epoch 0 and epoch 1 in full.
    iterator = task.train_iterator(611, seed=0)
    epoch0, _, epoch1 = next(iterator), next(iterator), next(iterator)
    assert not np.array_equal(epoch0["label"], epoch1["label"])


def test_batch_size_larger_than_train_split_is_an_error(task):
    with pytest.raises(ValueError, match="batch_size=5000"):
        task.train_iterator(5000, seed=0)


def test_param_tree_has_encoder_fusion_head(task):
    params = task.init_params(jax.random.key(0))
    assert _shapes(params) == {
            "encoder": {"Dense_0": {"kernel": (64, 32), "bias": (32,)}},
            "fusion": {"Dense_0": {"kernel": (32, 16), "bias": (16,)}},
            "head": {"kernel": (16, 10), "bias": (10,)},
    }


def test_fusion_dims_change_only_fusion_and_head_input(data_dir, task):
    wider = digits.build(_config(data_dir, **{"model.fusion_dims": (24, 8)}))
    old = _shapes(task.init_params(jax.random.key(0)))
    new = _shapes(wider.init_params(jax.random.key(0)))
    assert new["encoder"] == old["encoder"]
    assert new["fusion"] == {"Dense_0": {"kernel": (32, 24), "bias": (24,)},
                             "Dense_1": {"kernel": (24, 8), "bias": (8,)}}
    assert new["head"] == {"kernel": (8, 10), "bias": (10,)}


def test_parity_target_has_two_classes_and_changes_only_head(data_dir, task):
    parity = digits.build(_config(data_dir, **{"data.target": "parity"}))
    assert parity.class_names == ("even", "odd")
    old = _shapes(task.init_params(jax.random.key(0)))
    new = _shapes(parity.init_params(jax.random.key(0)))
    assert {k: new[k] for k in ("encoder", "fusion")} == {k: old[k] for k in ("encoder", "fusion")}
    assert new["head"] == {"kernel": (16, 2), "bias": (2,)}
    digit_batch = next(iter(task.eval_batches("test", 64)))
    parity_batch = next(iter(parity.eval_batches("test", 64)))
    np.testing.assert_array_equal(parity_batch["id"], digit_batch["id"])
    np.testing.assert_array_equal(parity_batch["label"], digit_batch["label"] % 2)


@pytest.mark.parametrize("overrides, match", [
        ({"data.target": "letters"}, "data.target='letters'"),
        ({"model.fusion_dims": ()}, "model.fusion_dims is empty"),
        ({"model.encoder_dims": (0,)}, "model.encoder_dims"),
        ({"data.val_fraction": 1.0}, "strictly between 0 and 1"),
])
def test_invalid_config_is_an_error(data_dir, overrides, match):
    with pytest.raises(ValueError, match=match):
        digits.build(_config(data_dir, **overrides))


def test_dropout_uses_the_given_rng_and_eval_is_deterministic(task):
    params = task.init_params(jax.random.key(0))
    batch = next(task.train_iterator(64, seed=0))
    loss_a, _ = task.loss_fn(params, batch, jax.random.key(1))
    loss_b, _ = task.loss_fn(params, batch, jax.random.key(1))
    loss_c, _ = task.loss_fn(params, batch, jax.random.key(2))
    assert loss_a == loss_b and loss_a != loss_c
    eval_batch = next(iter(task.eval_batches("val", 64)))
    np.testing.assert_array_equal(task.metrics_fn(params, eval_batch)["loss"],
                                  task.metrics_fn(params, eval_batch)["loss"])


def test_metrics_and_predictions_are_per_example(task):
    params = task.init_params(jax.random.key(0))
    batch = next(iter(task.eval_batches("test", 50)))
    metrics = task.metrics_fn(params, batch)
    assert {k: v.shape for k, v in metrics.items()} == {"loss": (50,), "accuracy": (50,)}
    probs = task.predict_fn(params, batch)
    assert probs.shape == (50, 10)
    np.testing.assert_allclose(probs.sum(axis=-1), 1.0, rtol=1e-5)
    np.testing.assert_array_equal(metrics["accuracy"], (probs.argmax(-1) == batch["label"]).astype(np.float32))


def test_jitted_training_reduces_the_loss(task):
    params = task.init_params(jax.random.key(0))
    tx = optax.adam(1e-2)
    opt_state = tx.init(params)

    @jax.jit
    def step(params, opt_state, batch, rng):
        (loss, aux), grads = jax.value_and_grad(task.loss_fn, has_aux=True)(params, batch, rng)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    @jax.jit
    def val_loss(params, batch):
        metrics = task.metrics_fn(params, batch)
        return jnp.sum(metrics["loss"] * batch["mask"]) / jnp.sum(batch["mask"])

    val_batch = next(iter(task.eval_batches("val", 256)))
    before = float(val_loss(params, val_batch))
    iterator = task.train_iterator(64, seed=0)
    for i in range(40):
        params, opt_state, _ = step(params, opt_state, next(iterator), jax.random.key(i))
    after = float(val_loss(params, val_batch))
    assert after < 0.5 * before
    assert step._cache_size() == 1


def test_resolve_data_dir_prefers_config_then_env(monkeypatch, tmp_path):
    monkeypatch.setenv(data.DATA_DIR_ENV, str(tmp_path / "env"))
    assert data.resolve_data_dir(str(tmp_path / "cfg")) == str(tmp_path / "cfg")
    assert data.resolve_data_dir("") == str(tmp_path / "env")
    monkeypatch.delenv(data.DATA_DIR_ENV)
    assert data.resolve_data_dir(None) == os.path.expanduser("~/.cache/jaxckpt/tfds")
