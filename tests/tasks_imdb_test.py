"""Tests for the IMDB task: tokenizer, vocabulary artifacts, pipelines under tfds mock data, and
preparing `imdb_reviews` without TensorFlow from a local HTTP server."""

import contextlib
import functools
import http.server
import io
import sys
import tarfile
import threading
from unittest import mock

import jax
import ml_collections
import numpy as np
import optax
import pytest
import tensorflow_datasets as tfds
from tensorflow_datasets.datasets.imdb_reviews import imdb_reviews_dataset_builder as tfds_imdb

from experiments.tasks import imdb, imdb_builder, tokenizer
from jaxckpt.runner.task import Task

NUM_MOCK_EXAMPLES = 40


def _config(data_dir, **overrides):
    config = ml_collections.ConfigDict({
            "task": "experiments.tasks.imdb",
            "seed": 0,
            "data": {"target": "sentiment", "data_dir": str(data_dir), "val_fraction": 0.25,
                     "vocab_size": 30, "max_length": 12},
            "model": {"embed_dim": 8, "encoder_dims": (16,), "fusion_dims": (8,), "dropout": 0.1},
    })
    for path, value in overrides.items():
        section, field = path.split(".")
        config[section][field] = value
    return config


@pytest.fixture
def mocked():
    with tfds.testing.mock_data(num_examples=NUM_MOCK_EXAMPLES, policy=tfds.testing.MockPolicy.USE_CODE):
        yield


@pytest.fixture
def task(mocked, tmp_path):
    return imdb.build(_config(tmp_path))


# Tokenizer.

def test_words_lowercases_strips_html_and_keeps_contractions():
    assert tokenizer.words("Didn't LIKE it.<br /><br />Über-bad, 2/10") == [
            "didn't", "like", "it", "über", "bad", "2", "10"]
    assert tokenizer.words(b"Caf\xc3\xa9 ok") == ["café", "ok"]


def test_vocab_orders_by_count_then_alphabetically_and_caps_size():
    texts = ["b a c", "c b", "d c", "e"]
    assert tokenizer.build_vocab(texts, vocab_size=3) == ["<pad>", "<unk>", "c", "b", "a"]
    assert tokenizer.build_vocab(texts, vocab_size=10) == ["<pad>", "<unk>", "c", "b", "a", "d", "e"]
    assert tokenizer.build_vocab(reversed(texts), vocab_size=3) == tokenizer.build_vocab(texts, 3)


def test_encode_maps_unknown_words_pads_and_truncates():
    tok = tokenizer.Tokenizer(["<pad>", "<unk>", "good", "film"])
    np.testing.assert_array_equal(tok.encode("Good film, great film", 6), [2, 3, 1, 3, 0, 0])
    np.testing.assert_array_equal(tok.encode("good good good good", 2), [2, 2])
    assert tok.encode("", 3).dtype == np.int32


@pytest.mark.parametrize("vocab, match", [
        (["good", "<pad>", "<unk>"], "must start with"),
        (["<pad>", "<unk>", "a", "b", "a"], r"repeats \['a'\]"),
])
def test_tokenizer_rejects_malformed_vocab(vocab, match):
    with pytest.raises(ValueError, match=match):
        tokenizer.Tokenizer(vocab)


# The task under tfds mock data.

def test_task_satisfies_protocol_with_splits_from_tfds(task):
    assert isinstance(task, Task)
    assert task.class_names == ("neg", "pos")
    sizes = {split: task.num_examples(split) for split in ("train", "val", "test")}
    assert sizes == {"train": 30, "val": 10, "test": NUM_MOCK_EXAMPLES}


def test_vocab_is_deterministic_and_from_the_train_part(task, tmp_path):
    vocab = task.artifacts()["vocab"]
    assert vocab[:2] == ["<pad>", "<unk>"] and len(vocab) == 30 + 2
    assert imdb.build(_config(tmp_path)).artifacts()["vocab"] == vocab
    train_texts = [task._split("train").source[i]["text"] for i in range(task.num_examples("train"))]
    assert vocab == tokenizer.build_vocab(train_texts, 30)


def test_saved_vocab_is_reused_instead_of_recounted(mocked, tmp_path):
    saved = ["<pad>", "<unk>", "zzz", "yyy"]
    task = imdb.build(_config(tmp_path), artifacts={"vocab": saved})
    assert task.artifacts() == {"vocab": saved}
    with mock.patch.object(tokenizer, "build_vocab", side_effect=AssertionError("recounted")):
        imdb.build(_config(tmp_path), artifacts={"vocab": saved})
    # Random mock words are never "zzz" or "yyy": everything is <unk> or padding.
    tokens = next(iter(task.eval_batches("test", 8)))["tokens"]
    assert set(np.unique(tokens)) <= {0, 1}


@pytest.mark.parametrize("artifacts, match", [
        ({"vocab": ["<pad>", "<unk>"] + [f"w{i}" for i in range(31)]}, "config.data.vocab_size=31"),
        ({"tokenizer": []}, "no 'vocab'"),
])
def test_unusable_saved_vocab_is_an_error(mocked, tmp_path, artifacts, match):
    with pytest.raises(ValueError, match=match):
        imdb.build(_config(tmp_path), artifacts=artifacts)


def test_other_target_is_an_error(mocked, tmp_path):
    with pytest.raises(ValueError, match="data.target='digit'"):
        imdb.build(_config(tmp_path, **{"data.target": "digit"}))


def test_batches_have_fixed_shapes(task):
    batch = next(task.train_iterator(8, seed=0))
    assert {k: (v.shape, v.dtype) for k, v in batch.items()} == {
            "tokens": ((8, 12), np.int32), "label": ((8,), np.int32)}
    batches = list(task.eval_batches("val", 4))
    assert [b["tokens"].shape for b in batches] == [(4, 12)] * 3
    assert batches[-1]["mask"].tolist() == [1.0, 1.0, 0.0, 0.0]
    ids = np.concatenate([b["id"][b["mask"] > 0] for b in batches])
    assert len(set(ids.tolist())) == 10 and (ids >= 0).all()


def test_train_iterator_resumes_exactly(task):
    iterator = task.train_iterator(4, seed=1)
    for _ in range(5):
        next(iterator)
    state = iterator.get_state()
    expected = [next(iterator) for _ in range(3)]
    resumed = task.train_iterator(4, seed=1)
    resumed.set_state(state)
    for want in expected:
        np.testing.assert_array_equal(next(resumed)["tokens"], want["tokens"])


def test_param_tree_keeps_the_embedding_in_the_encoder(task):
    params = task.init_params(jax.random.key(0))
    assert sorted(params) == ["encoder", "fusion", "head"]
    assert params["encoder"]["embedding"]["embedding"].shape == (32, 8)
    assert params["encoder"]["mlp"]["Dense_0"]["kernel"].shape == (8, 16)
    assert params["head"]["kernel"].shape == (8, 2)


def test_padding_does_not_change_the_logits(task):
    params = task.init_params(jax.random.key(0))
    tokens = np.array([[5, 6, 7] + [0] * 9], np.int32)
    more_padding = np.concatenate([tokens, np.zeros((1, 4), np.int32)], axis=1)
    np.testing.assert_allclose(task.model.apply({"params": params}, tokens),
                               task.model.apply({"params": params}, more_padding), rtol=1e-6)


def test_jitted_train_step_runs_and_trains_the_embedding(task):
    params = task.init_params(jax.random.key(0))
    tx = optax.sgd(0.1)
    opt_state = tx.init(params)

    @jax.jit
    def step(params, opt_state, batch, rng):
        (loss, aux), grads = jax.value_and_grad(task.loss_fn, has_aux=True)(params, batch, rng)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss, aux

    batch = next(task.train_iterator(8, seed=0))
    new_params, _, loss, aux = step(params, opt_state, batch, jax.random.key(1))
    assert np.isfinite(loss) and 0.0 <= aux["accuracy"] <= 1.0
    changed = np.abs(new_params["encoder"]["embedding"]["embedding"] - params["encoder"]["embedding"]["embedding"])
    assert changed.max() > 0
    probs = task.predict_fn(new_params, next(iter(task.eval_batches("test", 8))))
    np.testing.assert_allclose(probs.sum(axis=-1), 1.0, rtol=1e-5)


# Preparing the real builder without TensorFlow, from a local HTTP server.

def _fake_imdb_archive() -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
        for split, label, count in [("train", "pos", 6), ("train", "neg", 6), ("train", "unsup", 3),
                                    ("test", "pos", 4), ("test", "neg", 4)]:
            for i in range(count):
                text = f"A {'great' if label == 'pos' else 'dull'} film.<br />Review {split} {i}".encode()
                info = tarfile.TarInfo(f"aclImdb/{split}/{label}/{i}_7.txt")
                info.size = len(text)
                archive.addfile(info, io.BytesIO(text))
    return buffer.getvalue()


@contextlib.contextmanager
def _serve(directory):
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(directory))
    handler.log_message = lambda *args: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_imdb_reviews_prepares_without_tensorflow(tmp_path):
    (tmp_path / "www").mkdir()
    (tmp_path / "www" / "aclImdb_v1.tar.gz").write_bytes(_fake_imdb_archive())
    with _serve(tmp_path / "www") as url:
        with mock.patch.object(tfds_imdb, "_DOWNLOAD_URL", f"{url}/aclImdb_v1.tar.gz"):
            task = imdb.build(_config(tmp_path / "tfds", **{"data.val_fraction": 0.5}))
    assert "tensorflow" not in sys.modules
    assert {s: task.num_examples(s) for s in ("train", "val", "test")} == {"train": 6, "val": 6, "test": 8}
    vocab = task.artifacts()["vocab"]
    assert {"a", "film", "review", "train"} <= set(vocab) and "br" not in vocab and "test" not in vocab
    # Prepared once: tfds' own reader sees the same files, and a rebuild needs no server.
    sources = tfds.data_source(imdb_builder.NAME, data_dir=str(tmp_path / "tfds"))
    assert {name: len(source) for name, source in sources.items()} == {"train": 12, "test": 8, "unsupervised": 3}
    again = imdb.build(_config(tmp_path / "tfds", **{"data.val_fraction": 0.5}))
    assert again.artifacts()["vocab"] == vocab


def test_offline_without_a_prepared_dataset_fails_fast_saying_what_to_do(tmp_path, monkeypatch):
    # No network here, but do not rely on it: the connectivity check is replaced, and tfds' own
    # retrying download (about two minutes offline) must never start.
    checked = []
    monkeypatch.setattr(imdb_builder, "_reachable", lambda url: checked.append(url) or "gaierror: no network")
    download = mock.Mock(side_effect=AssertionError("tfds tried to download"))
    monkeypatch.setattr(tfds.download.DownloadManager, "download", download)
    with pytest.raises(imdb_builder.DatasetUnavailableError) as excinfo:
        imdb.build(_config(tmp_path / "tfds"))
    assert checked == [tfds_imdb._DOWNLOAD_URL] and not download.called
    message = str(excinfo.value)
    assert f"data.data_dir={tmp_path / 'tfds'}" in message and "ai.stanford.edu cannot be reached" in message
    assert "one run with internet access" in message and "--config.data.data_dir" in message
    # An archive downloaded earlier is used offline: no check, tfds reads its cache.
    (tmp_path / "tfds" / "downloads" / "ai.stanford.edu_amaas_aclImdb_v1abc.tar.gz").write_bytes(b"")
    checked.clear()
    with pytest.raises(AssertionError, match="tfds tried to download"):
        imdb.build(_config(tmp_path / "tfds"))
    assert checked == []
