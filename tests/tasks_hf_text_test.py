"""BERT on IMDB from an `hf:` folder (experiments/configs/bert_imdb.py): the hashing tokenizer, an
offline plan with every encoder leaf loaded and the head fresh, and train/val/test/predict under
`tfds.testing.mock_data` on the tiny BERT fixture."""

import csv
import json

import numpy as np
import pytest
import tensorflow_datasets as tfds

import jaxckpt
from experiments.configs import bert_imdb
from experiments.tasks import hf_text
from jaxckpt.cli import commands as cli
from tests.runs import ROOT, override

BERT = str(ROOT / "tests" / "fixtures" / "hf" / "bert")


def _config(data_dir, **overrides):
    config = bert_imdb.get_config()
    config.data.data_dir = str(data_dir)
    config.checkpoint.pretrained = f"hf:{BERT}"
    for key, value in {"train.num_steps": 6, "train.batch_size": 8, "train.eval_every_steps": 3,
                       "train.log_every_steps": 3, "checkpoint.every_steps": 3, "optimizer.warmup_steps": 2,
                       "checkpoint.async_save": False, "eval.batch_size": 16,
                       "data.val_fraction": 0.25}.items():
        config = override(config, **{key: value})
    return override(config, **overrides)


@pytest.fixture
def mocked():
    with tfds.testing.mock_data(num_examples=32, policy=tfds.testing.MockPolicy.USE_CODE):
        yield


def test_encode_hashes_words_into_the_vocabulary():
    ids = hf_text.encode("A great, great film!" + " word" * 40, vocab_size=100, max_length=16)
    assert ids[0] == hf_text.CLS and ids.dtype == np.int32 and len(ids) == 16
    assert ids[2] == ids[3]  # the same word, the same id
    assert ids[1:].min() >= 2 and ids.max() < 100
    short = hf_text.encode("ok", vocab_size=7, max_length=5)
    assert short.tolist()[2:] == [0, 0, 0] and 2 <= short[1] < 7


def test_plan_is_offline_and_loads_every_encoder_leaf_with_a_fresh_head(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    # No mock data and an empty data_dir: planning must not prepare (download) the dataset.
    args = ["plan", "--config", "experiments/configs/bert_imdb.py", f"--config.data.data_dir={tmp_path}"]
    assert cli.main(args) == 0
    out = capsys.readouterr().out
    loaded = [line.split()[1] for line in out.splitlines() if line.startswith("  loaded ")]
    assert len(loaded) == 39 and all(path.startswith("bert/") for path in loaded)
    assert "bert/encoder/layer_1/attention/query/kernel" in loaded
    assert "untouched  classifier/kernel" in out and "untouched  classifier/bias" in out
    assert list(tmp_path.iterdir()) == []


def test_train_val_test_and_predict_from_the_bert_folder(mocked, tmp_path):
    workdir = tmp_path / "bert_imdb"
    jaxckpt.run(_config(tmp_path / "tfds"), workdir)
    report = json.loads((workdir / "graft_report.json").read_text())
    assert report["counts"]["loaded"] == 39 and report["counts"]["untouched"] == 2 and report["ok"]
    hf_config = json.loads((workdir / "hf_config.json").read_text())
    assert hf_config["architectures"] == ["BertForSequenceClassification"]
    assert hf_config["id2label"] == {"0": "neg", "1": "pos"}
    points = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert {p["split"] for p in points} >= {"train", "val"}

    # Evaluate elsewhere: the model is rebuilt from the hf_config saved in the checkpoint, so the
    # pretrained folder is not needed any more.
    elsewhere = {"checkpoint.resume_file": str(workdir), "checkpoint.pretrained": ""}
    val = jaxckpt.run(_config(tmp_path / "tfds", run_type="val", **elsewhere), tmp_path / "eval")
    assert 0.0 <= val["accuracy"] <= 1.0
    jaxckpt.run(_config(tmp_path / "tfds", run_type="test", **elsewhere), tmp_path / "eval")
    path = jaxckpt.run(_config(tmp_path / "tfds", run_type="predict", **elsewhere), tmp_path / "eval")
    rows = list(csv.reader(path.open()))
    assert rows[0] == ["id", "prediction", "prob_neg", "prob_pos"] and len(rows) == 1 + 32

    # The finetuned classifier exports as an HF folder that loads back strictly.
    assert cli.main(["export", str(workdir), "--format", "hf", str(tmp_path / "out")]) == 0
    assert json.loads((tmp_path / "out" / "config.json").read_text())["architectures"] == \
        ["BertForSequenceClassification"]


def test_max_length_beyond_the_positions_is_refused(tmp_path):
    with pytest.raises(ValueError, match=r"max_length=17 must be in 2..16"):
        hf_text.build(_config(tmp_path, **{"data.max_length": 17}))
