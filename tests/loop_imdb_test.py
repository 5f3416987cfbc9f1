"""The IMDB experiment end to end through the loop, on tfds mock data (no download here)."""

import json

import pytest
import tensorflow_datasets as tfds

import jaxckpt
from experiments.configs import imdb
from tests.runs import override


def _config(data_dir, **overrides):
    config = imdb.get_config()
    config.data.data_dir = str(data_dir)
    config.data.vocab_size = 50
    config.data.max_length = 16
    config.data.val_fraction = 0.25
    config.model.embed_dim = 8
    config.model.encoder_dims = (16,)
    config.model.fusion_dims = (8,)
    config.train.num_steps = 8
    config.train.batch_size = 8
    config.train.eval_every_steps = 4
    config.train.log_every_steps = 4
    config.checkpoint.every_steps = 4
    config.checkpoint.async_save = False
    config.eval.batch_size = 16
    return override(config, **overrides)


@pytest.fixture
def mocked():
    with tfds.testing.mock_data(num_examples=64, policy=tfds.testing.MockPolicy.USE_CODE):
        yield


def test_imdb_train_val_resume_and_predict(mocked, tmp_path):
    workdir = tmp_path / "imdb"
    jaxckpt.run(_config(tmp_path / "tfds", **{"train.num_steps": 4}), workdir)
    vocab = json.loads((workdir / "vocab.json").read_text())
    assert vocab[:2] == ["<pad>", "<unk>"] and len(vocab) == 52
    state = jaxckpt.run(_config(tmp_path / "tfds"), workdir)
    assert int(state.step) == 8
    assert "resuming from this workdir's latest checkpoint, step 4" in (workdir / "train.log").read_text()
    # The vocabulary travels inside the checkpoint, so a predict run elsewhere rebuilds the same task.
    path = jaxckpt.run(_config(tmp_path / "tfds", **{"run_type": "predict", "checkpoint.resume_file": str(workdir)}),
                       tmp_path / "pred")
    lines = path.read_text().splitlines()
    assert lines[0] == "id,prediction,prob_neg,prob_pos"
    assert len(lines) - 1 == 64  # mock test split: one row per example
