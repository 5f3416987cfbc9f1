"""Tests for the byte-level language-model task: the stdlib corpus, its grain pipelines and the model."""

import logging
import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

import jaxckpt
from experiments.configs import lm as lm_config
from experiments.tasks import lm, lm_data

SEQ_LEN = 32


def _config(**overrides):
    config = ml_collections.ConfigDict({
            "task": "experiments.tasks.lm",
            "seed": 0,
            "model": {"num_layers": 2, "num_heads": 2, "d_model": 32, "d_ff": 64, "seq_len": SEQ_LEN, "dropout": 0.0},
            "data": {"source_dir": "", "corpus_mb": 0.3, "val_fraction": 0.2, "test_fraction": 0.2},
            "predict": {"prompt_len": 8, "sample_len": 12, "temperature": 0.0, "seed": 0},
    })
    for path, value in overrides.items():
        section, field = path.split(".")
        config[section][field] = value
    return config


@pytest.fixture(scope="module")
def task():
    return lm.build(_config())


@pytest.fixture(scope="module")
def params(task):
    return jax.jit(task.init_params)(jax.random.key(0))


def test_default_config_builds_the_layered_model():
    config = lm_config.get_config()
    assert config.task == "experiments.tasks.lm"
    model = lm.TransformerLM(
            num_layers=config.model.num_layers, num_heads=config.model.num_heads, d_model=config.model.d_model,
            d_ff=config.model.d_ff, max_len=config.model.seq_len,
    )
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"])
    assert sorted(shapes) == ["blocks_0", "blocks_1", "embed", "final_norm", "head", "pos_embed"]
    assert shapes["embed"]["embedding"].shape == (256, 128)
    assert shapes["head"]["kernel"].shape == (128, 256)


def test_corpus_is_sorted_bounded_and_split_by_path(task):
    corpus = task.corpus
    assert list(corpus.files) == sorted(corpus.files) and corpus.num_bytes == 300_000
    assert not any("site-packages" in f for f in corpus.files)
    joined = sum(len(b) for b in corpus.splits.values())
    assert joined == corpus.num_bytes + len(corpus.files) - 3  # one separator between files of a split
    # A file's split depends only on its path, so a larger budget keeps every earlier file in place.
    bigger = lm_data.read_corpus(lm_data.stdlib_dir(), 400_000, 0.2, 0.2)
    assert bigger.files[:len(corpus.files) - 1] == corpus.files[:-1]
    for name in lm_data.SPLITS:
        small = corpus.splits[name]
        np.testing.assert_array_equal(bigger.splits[name][:len(small)], small)


def test_artifacts_fingerprint_the_corpus_and_warn_when_it_changes(task, caplog):
    fingerprint = task.artifacts()["corpus"]
    assert fingerprint["python_version"].count(".") == 2
    assert fingerprint["num_bytes"] == 300_000 and len(fingerprint["corpus_sha256"]) == 64
    assert lm.build(_config()).artifacts() == task.artifacts()
    with caplog.at_level(logging.WARNING, logger=lm.__name__):
        lm.build(_config(), artifacts=task.artifacts())
        assert not caplog.records
        changed = dict(fingerprint, python_version="3.0.0")
        lm.build(_config(), artifacts={"corpus": changed})
    assert len(caplog.records) == 1 and "python_version: '3.0.0' -> " in caplog.records[0].getMessage()


def test_windows_are_shifted_by_one_byte(task):
    batch = next(task.eval_batches("val", 4))
    np.testing.assert_array_equal(batch["inputs"][:, 1:], batch["targets"][:, :-1])
    np.testing.assert_array_equal(batch["inputs"][1, 0], batch["targets"][0, -1])  # stride seq_len
    assert batch["inputs"].shape == (4, SEQ_LEN) and batch["inputs"].dtype == np.int32


def test_train_iterator_resumes_exactly_from_its_state(task):
    iterator = task.train_iterator(16, seed=3)
    for _ in range(5):
        next(iterator)
    state = iterator.get_state()
    expected = [next(iterator) for _ in range(3)]

    resumed = task.train_iterator(16, seed=3)
    resumed.set_state(state)
    for want in expected:
        got = next(resumed)
        assert sorted(got) == ["inputs", "targets"]
        for key in want:
            np.testing.assert_array_equal(got[key], want[key])
    assert not np.array_equal(next(task.train_iterator(16, seed=4))["inputs"], expected[0]["inputs"])


def test_eval_batches_are_padded_and_masked(task):
    num = task.num_examples("val")
    batch_size = 64
    batches = list(task.eval_batches("val", batch_size))
    assert len(batches) == math.ceil(num / batch_size) and num % batch_size  # the corpus gives a partial batch
    for batch in batches:
        assert {k: v.shape for k, v in batch.items()} == {
                "inputs": (batch_size, SEQ_LEN), "targets": (batch_size, SEQ_LEN), "id": (batch_size,),
                "mask": (batch_size,)}
        assert batch["mask"].dtype == np.float32 and batch["id"].dtype == np.int64
    real = num % batch_size
    last = batches[-1]
    np.testing.assert_array_equal(last["mask"], np.r_[np.ones(real), np.zeros(batch_size - real)])
    assert (last["id"][real:] == -1).all() and not last["inputs"][real:].any()
    ids = np.concatenate([b["id"][b["mask"] > 0] for b in batches])
    np.testing.assert_array_equal(ids, np.arange(num))


def test_metrics_are_per_example_and_summarize_adds_perplexity(task, params):
    batch = next(task.eval_batches("test", 8))
    metrics = jax.jit(task.metrics_fn)(params, batch)
    assert {k: v.shape for k, v in metrics.items()} == {"loss": (8,), "bits_per_byte": (8,)}
    # An untrained model is close to uniform over 256 bytes (ln 256 = 5.55 nats).
    assert ((5.0 < metrics["loss"]) & (metrics["loss"] < 7.0)).all(), metrics["loss"]
    np.testing.assert_allclose(metrics["bits_per_byte"], metrics["loss"] / math.log(2), rtol=1e-6)
    summary = task.summarize({"loss": 2.0, "bits_per_byte": 2.0 / math.log(2)})
    assert summary["perplexity"] == pytest.approx(math.exp(2.0)) and summary["loss"] == 2.0


def test_masked_eval_sums_give_the_exact_token_mean(task, params):
    state = jaxckpt.TrainState.create(apply_fn=None, params=params, tx=optax.sgd(0.0), rng=jax.random.PRNGKey(0))
    eval_step = jax.jit(jaxckpt.make_eval_step(task.metrics_fn))
    totals = None
    for batch in task.eval_batches("val", 64):  # 86 windows: the second batch is padded
        totals = jaxckpt.sum_metrics(totals, eval_step(state, batch))
    summary = task.summarize(jaxckpt.mean_metrics(totals))

    split = lm_data.Windows(task.corpus.splits["val"], SEQ_LEN)
    windows = [split[i] for i in range(len(split))]
    inputs, targets = (np.stack([w[key] for w in windows]) for key in ("inputs", "targets"))
    logits = jax.jit(task.model.apply)({"params": params}, inputs)
    token_mean = float(optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean())
    assert summary["num_examples"] == 86
    assert summary["loss"] == pytest.approx(token_mean, rel=1e-5)
    assert summary["perplexity"] == pytest.approx(math.exp(token_mean), rel=1e-5)


def test_loss_decreases_under_the_jitted_train_step(task, params):
    tx = optax.adam(3e-3)
    state = jaxckpt.TrainState.create(apply_fn=None, params=params, tx=tx, rng=jax.random.PRNGKey(0))
    step = jax.jit(jaxckpt.make_train_step(task.loss_fn))
    iterator = task.train_iterator(16, seed=0)
    losses = []
    for _ in range(30):
        state, metrics = step(state, next(iterator))
        losses.append(float(metrics["loss"]))
    assert step._cache_size() == 1
    assert np.mean(losses[-5:]) < np.mean(losses[:5]) - 1.0, losses
    assert float(metrics["bits_per_byte"]) == pytest.approx(losses[-1] / math.log(2), rel=1e-5)


def test_predictions_are_deterministic_strings_of_the_sample_length(task, params):
    predict = jax.jit(task.predict_fn)
    batch = list(task.eval_batches("val", 4))[-1]
    assert batch["mask"].tolist() == [1, 1, 0, 0]  # padding rows (id -1) are predicted too, harmlessly
    columns = jax.device_get(predict(params, batch))
    assert {k: v.shape for k, v in columns.items()} == {"prompt": (4, 8), "sample": (4, 12), "reference": (4, 12)}
    np.testing.assert_array_equal(columns["prompt"], batch["inputs"][:, :8])
    np.testing.assert_array_equal(columns["reference"], batch["inputs"][:, 8:20])
    assert ((columns["sample"] >= 0) & (columns["sample"] < 256)).all()
    np.testing.assert_array_equal(jax.device_get(predict(params, batch))["sample"], columns["sample"])

    formatted = task.format_predictions(columns)
    assert sorted(formatted) == ["prompt", "reference", "sample"]
    assert all(len(col) == 4 for col in formatted.values())
    assert formatted["prompt"][0] == bytes(batch["inputs"][0, :8].astype(np.uint8)).decode("utf-8", "replace")
    for row, text in zip(columns["sample"], formatted["sample"]):
        assert isinstance(text, str) and text == bytes(row.astype(np.uint8)).decode("utf-8", "replace")
    ascii_only = task.format_predictions({"sample": np.full((2, 12), ord("a")), "id": np.array([5, -1])})
    assert ascii_only == {"sample": ["a" * 12] * 2, "id": [5, -1]}
    assert task.format_predictions({"sample": np.array([[0xE2, 0x82, 0xAC, 0xFF]])})["sample"] == ["\u20ac\ufffd"]


def test_greedy_decoding_matches_the_model_step_by_step(task, params):
    batch = next(task.eval_batches("val", 2))
    sample = jax.device_get(jax.jit(task.predict_fn)(params, batch))["sample"]
    apply = jax.jit(task.model.apply)
    # Causal: the logits of a position ignore every later byte, so a zero-filled tail is harmless.
    tokens = np.zeros((2, 20), np.int32)
    tokens[:, :8] = batch["inputs"][:, :8]
    scrambled = tokens.copy()
    scrambled[:, 8:] = 97
    np.testing.assert_allclose(apply({"params": params}, tokens)[:, :8],
                               apply({"params": params}, scrambled)[:, :8], atol=1e-5)
    for position in range(8, 20):
        logits = apply({"params": params}, tokens)
        tokens[:, position] = np.argmax(logits[:, position - 1], axis=-1)
    np.testing.assert_array_equal(tokens[:, 8:], sample)


def test_sampling_per_example_ignores_batch_composition(params):
    sampler = lm.build(_config(**{"predict.temperature": 1.0}))
    predict = jax.jit(sampler.predict_fn)
    batch = next(sampler.eval_batches("val", 4))
    whole = jax.device_get(predict(params, batch))["sample"]
    reordered = {k: v[::-1].copy() for k, v in batch.items()}
    np.testing.assert_array_equal(jax.device_get(predict(params, reordered))["sample"], whole[::-1])
    other_seed = lm.build(_config(**{"predict.temperature": 1.0, "predict.seed": 1}))
    assert not np.array_equal(jax.device_get(jax.jit(other_seed.predict_fn)(params, batch))["sample"], whole)


def test_growing_two_to_four_layers_grafts_the_shared_blocks(task, params):
    big_task = lm.build(_config(**{"model.num_layers": 4}))
    big_params = jax.jit(big_task.init_params)(jax.random.key(1))
    grafted, report = jaxckpt.graft(params, big_params, strict=False)

    loaded = {entry.path for entry in report.loaded}
    small_paths = set(jaxckpt.flatten(params))
    assert loaded == small_paths
    assert {p.split("/")[0] for p in loaded} == {"embed", "pos_embed", "blocks_0", "blocks_1", "final_norm", "head"}
    missing = {entry.path for entry in report.missing}
    assert missing == {p for p in jaxckpt.flatten(big_params) if p.startswith(("blocks_2/", "blocks_3/"))}
    assert not report.mismatched and not report.unused

    flat_grafted, flat_small, flat_big = (jaxckpt.flatten(t) for t in (grafted, params, big_params))
    for path, value in flat_grafted.items():
        want = flat_small[path] if path in small_paths else flat_big[path]
        np.testing.assert_array_equal(value, want)
    batch = next(big_task.eval_batches("val", 2))
    assert jax.jit(big_task.metrics_fn)(grafted, batch)["loss"].shape == (2,)


def test_invalid_sizes_fail_with_the_field_name():
    with pytest.raises(ValueError, match="predict.prompt_len"):
        lm.build(_config(**{"predict.sample_len": SEQ_LEN}))
    with pytest.raises(ValueError, match="num_heads"):
        lm.build(_config(**{"model.num_heads": 3}))
    with pytest.raises(ValueError, match="corpus_mb"):
        lm.build(_config(**{"data.corpus_mb": 0.001}))


def test_pretrain_grow_and_predict_through_run_py(tmp_path):
    """The README flow at test size: pretrain 2 layers, grow to 4 (strict=False), sample as predictions."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    tiny = ["--config.model.d_model=32", "--config.model.d_ff=64", "--config.model.num_heads=2",
            f"--config.model.seq_len={SEQ_LEN}", "--config.data.corpus_mb=0.3", "--config.data.val_fraction=0.2",
            "--config.data.test_fraction=0.2", "--config.train.num_steps=20", "--config.train.batch_size=8",
            "--config.train.eval_every_steps=10", "--config.checkpoint.every_steps=10", "--config.eval.batch_size=32",
            "--config.optimizer.warmup_steps=5", "--config.predict.prompt_len=8", "--config.predict.sample_len=8",
            "--config.predict.max_examples=5"]

    def run(workdir, *flags):
        done = subprocess.run([sys.executable, "experiments/run.py", "--config", "experiments/configs/lm.py",
                               "--workdir", str(tmp_path / workdir), *tiny, *flags], cwd=root, capture_output=True,
                              text=True, timeout=600, env={**os.environ, "XLA_FLAGS": ""})
        assert done.returncode == 0, done.stderr[-3000:]
        return done

    run("lm")
    run("lm4", "--config.model.num_layers=4", f"--config.checkpoint.pretrained={tmp_path / 'lm'}",
        "--config.checkpoint.strict=False")
    report = json.loads((tmp_path / "lm4" / "graft_report.json").read_text())
    fresh = {e["path"].split("/")[0] for e in report["missing"]}
    assert fresh == {"blocks_2", "blocks_3"}
    assert {e["path"].split("/")[0] for e in report["loaded"]} == {"embed", "pos_embed", "blocks_0", "blocks_1",
                                                                    "final_norm", "head"}
    points = [json.loads(line) for line in (tmp_path / "lm4" / "metrics.jsonl").read_text().splitlines()]
    assert any(p["split"] == "val" and "perplexity" in p for p in points)
    run("lm4", "--config.model.num_layers=4", "--config.run_type=predict")
    import csv

    with open(tmp_path / "lm4" / "predictions.csv", newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["id", "prompt", "reference", "sample"] and len(rows) == 6  # header + max_examples
    assert all(len(row[1]) == 8 for row in rows[1:] if "\ufffd" not in row[1])  # prompt_len bytes of text
