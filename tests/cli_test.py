"""Tests for `python -m jaxckpt inspect|plan|zoo` through `jaxckpt.cli.commands` and one real subprocess."""

import json
import os
import pathlib
import shutil
import subprocess
import sys

import numpy as np
import pytest

from jaxckpt.checkpoint.manager import CheckpointManager
from jaxckpt.cli import commands as cli
from jaxckpt.weights import foreign

REPO = pathlib.Path(__file__).resolve().parents[1]

# A task module and a config file, written to a temporary folder on sys.path: the width of the
# model is a config field, so overriding it makes the plan mismatch.
_TASK = '''
import jax.numpy as jnp

class _Task:
    class_names = ("a", "b")

    def __init__(self, width):
        self.width = width

    def init_params(self, rng):
        return {"encoder": {"kernel": jnp.zeros((4, self.width))}, "head": {"kernel": jnp.zeros((self.width, 2))}}

def build(config, artifacts=None):
    return _Task(config.model.width)
'''

_CONFIG = '''
import ml_collections

def get_config():
    config = ml_collections.ConfigDict()
    config.task = "{task}"
    config.seed = 0
    config.model = ml_collections.ConfigDict()
    config.model.width = 3
    config.early_stop = ml_collections.ConfigDict()
    config.early_stop.criteria = "val/loss"
    config.early_stop.minimize = True
    config.checkpoint = ml_collections.ConfigDict()
    config.checkpoint.pretrained = ""
    config.checkpoint.strict = True
    config.checkpoint.mapping = ""
    config.checkpoint.skip = ""
    config.checkpoint.adapters = ""
    config.checkpoint.rename = ""
    config.optimizer = ml_collections.ConfigDict()
    config.optimizer.freeze = ""
    config.optimizer.lr_multipliers = ""
    return config
'''


@pytest.fixture
def setup(tmp_path, monkeypatch):
    """A run directory with steps 10, 20, 30 (best 20 by val/loss), a config file and an empty zoo."""
    task_name = f"cli_test_task_{os.getpid()}_{abs(hash(str(tmp_path))) % 10**8}"
    (tmp_path / f"{task_name}.py").write_text(_TASK)
    monkeypatch.syspath_prepend(str(tmp_path))
    config_path = tmp_path / "config_file.py"
    config_path.write_text(_CONFIG.format(task=task_name))
    monkeypatch.setenv("JAXCKPT_ZOO", str(tmp_path / "zoo"))

    run = tmp_path / "run"
    run.mkdir()
    config = {"task": task_name, "seed": 0, "model": {"width": 3}, "data": {"target": "parity"},
              "early_stop": {"criteria": "val/loss", "minimize": True}}
    (run / "config.json").write_text(json.dumps(config))
    manager = CheckpointManager(run / "checkpoints", max_to_keep=-1, best_metric="val/loss", async_save=False)
    for step, loss in ((10, 0.9), (20, 0.2), (30, 0.5)):
        params = {"encoder": {"kernel": np.full((4, 3), step, np.float32)},
                  "head": {"kernel": np.ones((3, 2), np.float32)}}
        state = {"step": np.int32(step), "params": params, "opt_state": {"mu": params}}
        manager.save(step, state, metrics={"val/loss": loss}, extra={"config": config})
    manager.close()
    return run, config_path


def test_inspect_run_dir(setup, capsys):
    run, _ = setup
    assert cli.main(["inspect", str(run)]) == 0
    out = capsys.readouterr().out
    assert "steps:       10, 20, 30" in out
    assert "latest:      30" in out
    assert "best:        20 by val/loss (min)" in out
    assert "0.2" in out and "0.9" in out  # metrics per step
    assert "model.width = 3" in out
    assert "data.target = 'parity'" in out  # what the head predicts: a finetune onto parity changes it
    assert "state of step 30" in out
    assert "params/encoder/kernel  (4, 3)  float32" in out
    assert "params/head/kernel" in out
    # opt_state is summarised, not listed, without --all.
    assert "opt_state/mu" not in out
    total = [line for line in out.splitlines() if line.startswith("total")][0].split()
    assert total[1:3] == ["5", "37"]  # arrays: 2 params + 2 opt_state + step; values: 12+6+12+6+1


def test_inspect_step_dir_and_best_and_all(setup, capsys):
    run, _ = setup
    assert cli.main(["inspect", str(run / "checkpoints" / "10"), "--all"]) == 0
    out = capsys.readouterr().out
    assert "state of step 10" in out and "opt_state/mu/encoder/kernel" in out
    assert cli.main(["inspect", str(run), "--step", "best"]) == 0
    assert "state of step 20" in capsys.readouterr().out


def test_inspect_errors_name_the_culprit(setup, capsys, tmp_path):
    run, _ = setup
    assert cli.main(["inspect", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err
    assert "missing" in err and "does not exist" in err and "Traceback" not in err
    assert cli.main(["inspect", str(run), "--step", "7"]) == 2
    assert "[10, 20, 30]" in capsys.readouterr().err
    assert cli.main(["inspect", "zoo:nope"]) == 2
    assert "no zoo entry named 'nope'" in capsys.readouterr().err


def test_zoo_publish_list_and_inspect(setup, capsys):
    run, _ = setup
    assert cli.main(["zoo", "list"]) == 0
    assert "empty" in capsys.readouterr().out
    assert cli.main(["zoo", "publish", str(run), "tiny", "--best"]) == 0
    assert "published zoo:tiny (step 20" in capsys.readouterr().out
    assert cli.main(["zoo", "publish", str(run), "tiny"]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert cli.main(["zoo", "publish", str(run), "tiny", "--step", "10", "--overwrite"]) == 0
    capsys.readouterr()
    assert cli.main(["zoo", "list"]) == 0
    listing = capsys.readouterr().out
    assert "zoo:tiny" in listing and "val/loss=0.9" in listing
    assert cli.main(["inspect", "zoo:tiny"]) == 0
    out = capsys.readouterr().out
    assert "zoo entry:   tiny (step 10" in out and "steps:       10\n" in out


def test_zoo_publish_rejects_step_and_best_together(setup, capsys):
    run, _ = setup
    assert cli.main(["zoo", "publish", str(run), "tiny", "--step", "10", "--best"]) == 2
    assert "not allowed with" in capsys.readouterr().err


def test_plan_that_would_succeed(setup, capsys):
    run, config_path = setup
    assert cli.main(["plan", str(run), "--config", str(config_path)]) == 0
    out = capsys.readouterr().out
    assert "loaded 2" in out and "mismatched 0" in out
    assert "would succeed" in out


def test_plan_from_zoo_and_from_config_pretrained(setup, capsys):
    run, config_path = setup
    assert cli.main(["zoo", "publish", str(run), "tiny"]) == 0
    assert cli.main(["plan", "zoo:tiny", "--config", str(config_path)]) == 0
    assert cli.main(["plan", "--config", str(config_path), "--config.checkpoint.pretrained=zoo:tiny"]) == 0
    assert "loaded 2" in capsys.readouterr().out


def test_plan_strict_mismatch_fails_and_non_strict_passes(setup, capsys):
    run, config_path = setup
    args = ["plan", str(run), "--config", str(config_path), "--config.model.width=5"]
    assert cli.main(args) == 2
    captured = capsys.readouterr()
    assert "mismatched 2" in captured.out
    assert "encoder/kernel" in captured.err and "(4, 3) vs target (4, 5)" in captured.err
    assert "strict=False" in captured.err and "Traceback" not in captured.err
    assert cli.main(args + ["--config.checkpoint.strict=False"]) == 0
    assert cli.main(args + ["--config.checkpoint.skip=encoder,head"]) == 0
    assert "skipped 2" in capsys.readouterr().out


@pytest.mark.parametrize("override, message", [
        ("--config.model.widht=5", "unknown config key 'widht' in --config.model.widht=5 (did you mean 'width'?)"),
        ("--config.seed=abc", "--config.seed=abc"),
        ("--config.checkpoint.skip=decoder", "'decoder' matches no target path"),
        ("--config.checkpoint.mapping=foo:bar", "'foo':'bar' matches no source path"),
])
def test_plan_user_errors(setup, capsys, override, message):
    run, config_path = setup
    assert cli.main(["plan", str(run), "--config", str(config_path), override]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


@pytest.mark.parametrize("override, message", [
        ("--config.model.widht=5", "unknown config key 'widht' in --config.model.widht=5 (did you mean 'width'?)"),
        # A misspelt section is ml_collections' KeyError (a misspelt field is an AttributeError).
        ("--config.modle.width=5", "unknown config key 'modle' in --config.modle.width=5 (did you mean 'model'?)"),
        ("--config.checkpiont.strict=False",
         "unknown config key 'checkpiont' in --config.checkpiont.strict=False (did you mean 'checkpoint'?)"),
        ("--config.zzz=1", "unknown config key 'zzz' in --config.zzz=1. The config is locked"),
])
def test_plan_unknown_config_key_is_one_line(setup, capsys, override, message):
    run, config_path = setup
    assert cli.main(["plan", str(run), "--config", str(config_path), override]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1, err


def test_plan_missing_config_file(setup, capsys, tmp_path):
    run, _ = setup
    assert cli.main(["plan", str(run), "--config", str(tmp_path / "nope.py")]) == 2
    assert "nope.py' does not exist" in capsys.readouterr().err
    broken = tmp_path / "broken.py"
    broken.write_text("def get_config(:\n")
    assert cli.main(["plan", str(run), "--config", str(broken)]) == 2
    err = capsys.readouterr().err
    assert f"cannot load the config file {str(broken)!r}" in err and len(err.strip().splitlines()) == 1, err


def test_subprocess_bad_path_exits_2_without_traceback(tmp_path):
    env = {**os.environ, "JAXCKPT_ZOO": str(tmp_path / "zoo"), "JAX_PLATFORMS": "cpu"}
    result = subprocess.run([sys.executable, "-m", "jaxckpt", "inspect", str(tmp_path / "no_run")],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert f"{tmp_path / 'no_run'} does not exist" in result.stderr


def test_plan_shows_frozen_and_scaled_leaves_and_warns_about_fresh_frozen_ones(setup, capsys):
    run, config_path = setup
    args = ["plan", str(run), "--config", str(config_path), "--config.optimizer.freeze=encoder"]
    assert cli.main(args + ["--config.optimizer.lr_multipliers=head:10"]) == 0
    out = capsys.readouterr().out
    assert "training: optimizer.freeze='encoder' optimizer.lr_multipliers='head:10'" in out
    rows = {line.split()[0]: line.split()[-2:]
            for line in out.splitlines() if line.startswith(("encoder/", "head/"))}
    assert rows == {"encoder/kernel": ["loaded", "frozen"], "head/kernel": ["loaded", "x10"]}
    assert "frozen   1 leaf, 12 values: no update, no optimizer moments" in out
    assert "warning" not in out
    assert cli.main(args + ["--config.checkpoint.skip=encoder"]) == 0
    assert "warning: frozen but not loaded, so trained around its random initialisation: encoder/kernel" in \
        capsys.readouterr().out
    assert cli.main(["plan", str(run), "--config", str(config_path)]) == 0
    assert "training:" not in capsys.readouterr().out  # nothing frozen or scaled: no section
    assert cli.main(args[:-1] + ["--config.optimizer.freeze=decoder"]) == 2
    err = capsys.readouterr().err
    assert "['decoder'] match no parameter path" in err and "encoder/kernel" in err


def test_inspect_labels_params_from_the_saved_optimizer_config(setup, capsys):
    run, _ = setup
    config = json.loads((run / "config.json").read_text())
    config["optimizer"] = {"freeze": "encoder", "lr_multipliers": "head:0.1"}
    (run / "config.json").write_text(json.dumps(config))
    assert cli.main(["inspect", str(run)]) == 0
    out = capsys.readouterr().out
    assert "optimizer.freeze = 'encoder'" in out
    rows = {line.split()[0]: line.split()[-1] for line in out.splitlines() if line.startswith("params/")}
    assert rows == {"params/encoder/kernel": "frozen", "params/head/kernel": "x0.1"}
    assert "x0.1     1 leaf, 6 values: learning rate times 0.1" in out
    # A saved pattern that does not fit these params (e.g. a step copied from elsewhere) is noted.
    config["optimizer"] = {"freeze": "decoder"}
    (run / "config.json").write_text(json.dumps(config))
    assert cli.main(["inspect", str(run)]) == 0
    out = capsys.readouterr().out
    assert "not applicable to these params" in out and "'decoder'" in out and "frozen" not in out


def test_export_writes_only_params_of_the_chosen_step(setup, capsys, tmp_path):
    run, _ = setup
    out = tmp_path / "out" / "model.safetensors"
    assert cli.main(["export", str(run), str(out)]) == 0
    printed = capsys.readouterr().out
    assert "params of step 30" in printed and "2 tensors" in printed and "torch layout" in printed
    assert f"--config.checkpoint.pretrained={out}" in printed
    with __import__("safetensors").safe_open(str(out), framework="numpy") as f:
        assert sorted(f.keys()) == ["encoder.weight", "head.weight"]  # no optimizer state
        assert f.get_tensor("encoder.weight").shape == (3, 4)
    np.testing.assert_array_equal(np.asarray(foreign.read_foreign(out)["encoder/kernel"]), np.full((4, 3), 30))
    for flags, value in ((["--step", "10"], 10), (["--best"], 20)):
        assert cli.main(["export", str(run), str(out), "--layout", "flax", *flags]) == 0
        flat = foreign.read_foreign(out)
        assert sorted(flat) == ["encoder/kernel", "head/kernel"]
        np.testing.assert_array_equal(np.asarray(flat["encoder/kernel"]), np.full((4, 3), value))
    assert cli.main(["zoo", "publish", str(run), "tiny", "--step", "10"]) == 0
    assert cli.main(["export", "zoo:tiny", str(out)]) == 0
    assert "params of step 10 (zoo:tiny)" in capsys.readouterr().out


@pytest.mark.parametrize("extra, message", [
    (["OUT.npz"], "must end in .safetensors"),
    (["OUT.safetensors", "--step", "7"], "saved steps: [10, 20, 30]"),
    (["OUT.safetensors", "--step", "10", "--best"], "not allowed with"),
    (["OUT.safetensors", "--layout", "tf"], "invalid choice: 'tf'"),
])
def test_export_errors(setup, capsys, tmp_path, extra, message):
    run, _ = setup
    extra = [str(tmp_path / e) if e.startswith("OUT") else e for e in extra]
    assert cli.main(["export", str(run), *extra]) == 2
    assert message in capsys.readouterr().err
    assert not list(tmp_path.glob("OUT*"))


def test_export_best_without_a_criteria_says_to_pass_a_step(setup, capsys, tmp_path):
    run, _ = setup
    (run / "config.json").write_text(json.dumps({"task": "x", "early_stop": {"criteria": ""}}))
    assert cli.main(["export", str(run), str(tmp_path / "m.safetensors"), "--best"]) == 2
    assert "pass --step N instead" in capsys.readouterr().err


def test_plan_of_a_weights_file_with_other_names_points_to_rename(setup, capsys, tmp_path):
    _, config_path = setup
    path = tmp_path / "torch.safetensors"
    foreign.write_safetensors({"enc": {"kernel": np.ones((4, 3), np.float32)},
                               "head": {"kernel": np.ones((3, 2), np.float32)}}, path)
    args = ["plan", str(path), "--config", str(config_path)]
    assert cli.main(args) == 2
    err = capsys.readouterr().err
    assert "enc/kernel" in err and "--config.checkpoint.rename=" in err
    assert cli.main(args + [r"--config.checkpoint.rename=enc\.weight=>encoder/kernel"]) == 0
    assert "loaded 2" in capsys.readouterr().out


@pytest.mark.parametrize("how", ["flip", "truncate"])
def test_verify_and_inspect_name_a_damaged_step(tmp_path, capsys, how):
    from tests.formats_test import NEWEST

    run = shutil.copytree(NEWEST, tmp_path / "run")
    for data in (run / "checkpoints" / "4" / "state" / "d").iterdir():
        raw = bytearray(data.read_bytes())
        if how == "flip":
            for at in range(64, len(raw), 97):  # bytes inside the arrays, not only in one header
                raw[at] ^= 0xFF
        else:
            raw = raw[: len(raw) // 2]
        data.write_bytes(bytes(raw))
    assert cli.main(["verify", str(run)]) == 1
    out = capsys.readouterr().out
    assert "step 2: ok: " in out and "step 6: ok: " in out and "xxh3_64 checksum (format 2" in out
    (line,) = [x for x in out.splitlines() if x.startswith("step 4: ")]
    assert line.startswith("step 4: CORRUPT: ") and str(run / "checkpoints" / "4") in line
    if how == "flip":
        assert "params/" in line or "opt_state/" in line  # names the arrays whose bytes changed
    assert "1 of 3 step(s)" in out
    assert cli.main(["inspect", str(run), "--step", "4"]) == 1
    assert "integrity of step 4: CORRUPT" in capsys.readouterr().out
    assert cli.main(["inspect", str(run), "--step", "6"]) == 0
    assert "integrity of step 6: ok" in capsys.readouterr().out
    assert cli.main(["verify", str(run / "checkpoints" / "6")]) == 0
