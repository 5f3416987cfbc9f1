"""Where a run starts from, with the inputs a new user got wrong (issue 11's bug list)."""

import math
import os
import shutil
import subprocess
import sys

import pytest

import jaxckpt
from jaxckpt.checkpoint.manager import CheckpointManager
from jaxckpt.cli.exits import exit_code_of
from jaxckpt.errors import CheckpointNotFoundError, NonFiniteLossError, UserError
from jaxckpt.runner import loop
from tests.formats_test import NEWEST, RELEASES, _config
from tests.preemption_test import CLI_ENV, cli_args
from tests.runs import ROOT


def test_readers_find_best_from_what_the_steps_record():
    # No best_metric passed: the steps say they were ranked by val/loss (min).
    manager = CheckpointManager(NEWEST / "checkpoints", read_only=True)
    assert manager.policy.best_metric == "val/loss" and manager.policy.best_mode == "min"
    losses = {s: manager.metrics(s)["val/loss"] for s in manager.all_steps()}
    assert manager.best_step() == min(losses, key=losses.get)


@pytest.mark.parametrize("run_dir", RELEASES, ids=[p.name for p in RELEASES])
def test_resume_file_with_resume_best_evaluates_the_best_step(tmp_path, data_dir, run_dir):
    # Format 2 records the rule; format 1 steps are ranked by the config's early_stop.criteria.
    best = CheckpointManager(run_dir / "checkpoints", read_only=True, best_metric="val/loss").best_step()
    config = _config(data_dir, **{"run_type": "val", "checkpoint.resume_file": str(run_dir),
                                  "checkpoint.resume_best": True})
    result = jaxckpt.run(config, tmp_path / "eval")
    assert result["step"] == best and math.isfinite(result["loss"])


def test_a_missing_resume_file_names_its_config_key(tmp_path, data_dir):
    config = _config(data_dir, **{"run_type": "val", "checkpoint.resume_file": str(tmp_path / "nope")})
    with pytest.raises(CheckpointNotFoundError, match=rf"^checkpoint.resume_file={tmp_path / 'nope'}: checkpoint "
                       "path .* does not exist"):
        jaxckpt.run(config, tmp_path / "eval")


@pytest.mark.slow
def test_a_corrupt_pretrained_source_is_one_line_and_leaves_nothing(tmp_path, data_dir):
    source = shutil.copytree(NEWEST, tmp_path / "source")
    for step in (2, 4, 6):
        for data in (source / "checkpoints" / str(step) / "state" / "d").iterdir():
            data.write_bytes(data.read_bytes()[: data.stat().st_size // 2])
    workdir = tmp_path / "new"
    args = cli_args(_config(data_dir, **{"checkpoint.pretrained": str(source)}), workdir)
    done = subprocess.run([sys.executable, str(ROOT / "experiments" / "run.py"), *args], cwd=ROOT,
                          env={**os.environ, **CLI_ENV}, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr[-3000:]
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith(f"jaxckpt: error: checkpoint.pretrained={source}: "), done.stderr[-3000:]
    assert "is corrupt" in last and "Traceback" not in done.stderr
    assert not workdir.exists()  # no .lock, empty checkpoints/ or train.log left behind


def test_nan_before_any_checkpoint_says_there_is_none(tmp_path):
    with CheckpointManager(tmp_path) as manager:
        with pytest.raises(NonFiniteLossError, match="no checkpoint was saved before it") as e:
            loop._check_finite({"loss": float("nan")}, 3, manager)
    assert "step None" not in str(e.value) and "starts from the beginning" in str(e.value)


def _mean_of_nothing():
    from jaxckpt.train.step import mean_metrics

    mean_metrics({"count": 0.0})  # a ValueError raised by jaxckpt itself


@pytest.mark.parametrize("error, message", [
    (CheckpointNotFoundError("Checkpoint path /x does not exist"), "Checkpoint path /x does not exist"),
    (UserError("bad input"), "bad input"),
    (_mean_of_nothing, "no examples were evaluated (count is 0); is the split empty?"),
])
def test_every_user_error_has_one_prefix(capsys, error, message):
    def fail():
        if callable(error):
            error()
        raise error

    assert exit_code_of(fail) == 2
    assert capsys.readouterr().err == f"jaxckpt: error: {message}\n"
