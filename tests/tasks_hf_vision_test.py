"""The offline `hf:` flow end to end on the real digits: train a tiny ViT, export the run as an HF
folder, look at it, plan and finetune from it onto parity with a fresh head."""

import json

import jax
import numpy as np
import pytest

import jaxckpt
from experiments.configs import vit_digits
from experiments.tasks import hf_vision
from jaxckpt.cli import commands as cli
from jaxckpt.tree import treepath
from tests.runs import ROOT, override, tiny_config


def _config(data_dir, **overrides):
    config = vit_digits.get_config()
    config.data.data_dir = str(data_dir)
    for key, value in {"train.num_steps": 20, "train.batch_size": 32, "train.eval_every_steps": 10,
                       "train.log_every_steps": 10, "checkpoint.every_steps": 10,
                       "checkpoint.async_save": False, "eval.batch_size": 128}.items():
        config = override(config, **{key: value})
    return override(config, **overrides)


def test_pixel_values_enlarge_the_digit_over_three_channels():
    image = np.arange(64).reshape(8, 8) % 17
    pixels = hf_vision.pixel_values(image, 16, 3)
    assert pixels.shape == (3, 16, 16) and pixels.dtype == np.float32
    np.testing.assert_array_equal(pixels[2, 2:4, 4:6], np.full((2, 2), image[1, 2] / 16.0))
    assert pixels.max() <= 1.0


def test_train_export_inspect_plan_and_finetune_from_the_folder(data_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)  # plan imports the config's task module from the repository root
    run, out = tmp_path / "vit", tmp_path / "vit_hf"
    state = jaxckpt.run(_config(data_dir), run)
    assert json.loads((run / "hf_config.json").read_text())["architectures"] == ["ViTForImageClassification"]

    assert cli.main(["export", str(run), "--format", "hf", str(out)]) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["id2label"]["9"] == "9" and config["image_size"] == 16
    # The run's params come back from the folder bit for bit.
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state.params)
    back, report = jaxckpt.load_params(f"hf:{out}", abstract)
    assert report.ok
    for path, leaf in treepath.flatten(state.params).items():
        assert np.asarray(treepath.flatten(back)[path]).tobytes() == np.asarray(leaf).tobytes(), path

    capsys.readouterr()
    assert cli.main(["inspect", f"hf:{out}"]) == 0
    shown = capsys.readouterr().out
    assert "family:      vit_image_classifier" in shown
    assert "vit.encoder.layer.1.attention.attention.query.weight (transposed)" in shown

    finetune = ["--config.data.target=parity", f"--config.data.data_dir={data_dir}",
                "--config.checkpoint.mapping=vit:vit"]
    assert cli.main(["plan", f"hf:{out}", "--config", "experiments/configs/vit_digits.py", *finetune]) == 0
    plan = capsys.readouterr().out
    assert "untouched  classifier/kernel" in plan and "loaded 38 " in plan
    assert plan.count("\n  loaded ") == 38  # every leaf listed

    parity = _config(data_dir, **{"data.target": "parity", "checkpoint.pretrained": f"hf:{out}",
                                  "checkpoint.mapping": "vit:vit", "train.num_steps": 10})
    jaxckpt.run(parity, tmp_path / "parity")
    grafted = json.loads((tmp_path / "parity" / "graft_report.json").read_text())
    assert grafted["counts"]["loaded"] == 38 and grafted["counts"]["untouched"] == 2
    saved = json.loads((tmp_path / "parity" / "hf_config.json").read_text())
    assert saved["id2label"] == {"0": "even", "1": "odd"}


def test_export_of_a_run_without_an_hf_config_says_how(data_dir, tmp_path, capsys):
    jaxckpt.run(tiny_config(data_dir, **{"train.num_steps": 2, "checkpoint.every_steps": 2,
                                         "train.eval_every_steps": 2}), tmp_path / "mlp")
    assert cli.main(["export", str(tmp_path / "mlp"), "--format", "hf", str(tmp_path / "out")]) == 2
    assert "Pass --hf-config PATH/TO/config.json" in capsys.readouterr().err
    assert cli.main(["export", str(tmp_path / "mlp"), "--format", "hf", str(tmp_path / "o.safetensors")]) == 2
    assert "writes a folder" in capsys.readouterr().err


def test_a_non_vit_config_is_refused(data_dir):
    config = _config(data_dir, **{"model.hf_config": str(ROOT / "tests/fixtures/hf/bert")})
    with pytest.raises(ValueError, match="model_type 'bert'"):
        hf_vision.build(config)
