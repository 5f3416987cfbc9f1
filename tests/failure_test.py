"""Failure safety of the loop: corrupt checkpoints, bad inputs, a full disk, two runs on one workdir."""

import concurrent.futures
import errno
import os
import shutil
import signal
import subprocess
import sys

import jax
import numpy as np
import pytest

import jaxckpt
from jaxckpt.checkpoint.manager import CheckpointManager
from jaxckpt.cli.exits import run_or_exit
from jaxckpt.errors import CheckpointSaveError, SaveFailedError, UserError
from tests.preemption_test import CLI_ENV, Running, cli_args, committed_steps
from tests.runs import ROOT, run_cli, tiny_config

SHORT = {"train.num_steps": 20, "train.eval_every_steps": 10, "checkpoint.every_steps": 10}


@pytest.fixture(scope="module")
def source_run(tmp_path_factory, data_dir):
    """A finished 20-step run with checkpoints 10 and 20 (copied, never written to)."""
    workdir = tmp_path_factory.mktemp("source")
    jaxckpt.run(tiny_config(data_dir, **SHORT), workdir)
    return workdir


def _copy(run, dest):
    shutil.copytree(run, dest, ignore=shutil.ignore_patterns(".lock"))
    return dest


def _damage(step_dir, how):
    """Truncates, or flips one byte in the middle of, every array data file of a step."""
    files = [p for p in (step_dir / "state").rglob("*") if p.is_file() and p.parent.name == "d"]
    assert files, f"no ocdbt data files under {step_dir / 'state'}"
    for path in files:
        data = bytearray(path.read_bytes())
        if how == "truncate":
            data = data[: len(data) // 2]
        else:
            data[len(data) // 2] ^= 0xFF
        path.write_bytes(bytes(data))


# Corrupt checkpoints.

@pytest.mark.parametrize("how", ["truncate", "flip"])
def test_auto_resume_falls_back_past_a_corrupt_latest_step(tmp_path, data_dir, source_run, how):
    workdir = _copy(source_run, tmp_path / "run")
    _damage(workdir / "checkpoints" / "20", how)
    state = jaxckpt.run(tiny_config(data_dir, **{**SHORT, "train.num_steps": 30}), workdir)
    assert int(state.step) == 30
    log = (workdir / "train.log").read_text()
    assert "WARNING checkpoint step 20 is corrupt and was moved to" in log
    assert "resuming from this workdir's latest checkpoint, step 10" in log
    aside = workdir / "checkpoints" / "corrupt" / "20"
    assert (aside / "state").is_dir(), "the corrupt step is kept aside, not deleted"
    assert committed_steps(workdir) == [10, 20, 30]  # 20 and 30 retrained from 10


def test_every_step_corrupt_is_an_error_that_keeps_them(tmp_path, data_dir, source_run):
    workdir = _copy(source_run, tmp_path / "run")
    for step in (10, 20):
        _damage(workdir / "checkpoints" / str(step), "truncate")
    with pytest.raises(UserError, match=r"every checkpoint in .* is corrupt"):
        jaxckpt.run(tiny_config(data_dir, **SHORT), workdir)
    assert sorted(p.name for p in (workdir / "checkpoints" / "corrupt").iterdir()) == ["10", "20"]


# Bad inputs through the command line, all started at once (each is mostly interpreter start-up).

def _bad_inputs(data_dir, source_run, tmp_path):
    corrupt = _copy(source_run, tmp_path / "corrupt")
    _damage(corrupt / "checkpoints" / "20", "flip")
    other = _copy(source_run, tmp_path / "other")
    nan = {"optimizer.name": "sgd", "optimizer.learning_rate": 1e30, "checkpoint.every_steps": 1,
           "train.log_every_steps": 1, "train.eval_every_steps": 1}
    pre = {"checkpoint.pretrained": str(source_run)}
    cases = {  # name: (config overrides, extra flags, what stderr must name)
        "missing_pretrained": ({"checkpoint.pretrained": "/nonexistent/run"}, [], "/nonexistent/run"),
        "missing_resume_file": ({"checkpoint.resume_file": "/nonexistent/step"}, [], "/nonexistent/step"),
        "unknown_key": ({}, ["--config.train.nmu_steps=3"], "nmu_steps"),
        "mapping_matches_nothing": ({**pre, "checkpoint.mapping": "nothere:encoder"}, [], "nothere"),
        "skip_matches_nothing": ({**pre, "checkpoint.skip": "nomatch_.*"}, [], "nomatch_.*"),
        "strict_shape_mismatch": ({**pre, "model.fusion_dims": (8,)}, [], "fusion/Dense_0/kernel"),
        "other_experiment": ({"model.fusion_dims": (8,)}, [], "holds a different experiment"),
        "nan_loss": (nan, [], "loss=nan"),
        "corrupt_resume_file": ({"checkpoint.resume_file": str(corrupt / "checkpoints" / "20")}, [],
                                str(corrupt / "checkpoints" / "20")),
    }
    def start(name):
        overrides, flags, _ = cases[name]
        workdir = other if name == "other_experiment" else tmp_path / name
        args = cli_args(tiny_config(data_dir, **{**SHORT, **overrides}), workdir) + flags
        return subprocess.Popen([sys.executable, str(ROOT / "experiments" / "run.py"), *args], cwd=ROOT,
                                env={**os.environ, **CLI_ENV}, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True)

    def run(name):
        proc = start(name)
        _, stderr = proc.communicate(timeout=300)
        return name, (proc.returncode, stderr, cases[name][2], tmp_path / name)

    # Two at a time: more only makes the processes fight over the two CPU cores of CI.
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        return dict(pool.map(run, cases))


@pytest.mark.parametrize("args, message", [
    # A misspelt section is ml_collections' KeyError, a misspelt field an AttributeError.
    (["--config.trian.num_steps=3"], "unknown config key 'trian' in --config.trian.num_steps=3 (did you mean 'train'?)"),
    (["--config.train.nmu_steps=3"], "unknown config key 'nmu_steps' in --config.train.nmu_steps=3 (did you mean"),
    (["--config=experiments/configs/nope.py"], "config file 'experiments/configs/nope.py' does not exist"),
])
def test_bad_command_line_is_one_line_and_creates_nothing(tmp_path, args, message):
    done = run_cli(["--config", "experiments/configs/digits.py", "--workdir", str(tmp_path / "run"), *args],
                   timeout=120)
    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith(f"jaxckpt: error: {message}"), done.stderr
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert not (tmp_path / "run").exists()


@pytest.fixture(scope="module")
def bad_inputs(tmp_path_factory, data_dir, source_run):
    return _bad_inputs(data_dir, source_run, tmp_path_factory.mktemp("bad"))


@pytest.mark.slow
@pytest.mark.parametrize("case", ["missing_pretrained", "missing_resume_file", "unknown_key",
                                  "mapping_matches_nothing", "skip_matches_nothing", "strict_shape_mismatch",
                                  "other_experiment", "nan_loss", "corrupt_resume_file"])
def test_bad_input_fails_naming_the_culprit_without_traceback(bad_inputs, case):
    code, stderr, culprit, _ = bad_inputs[case]
    assert code != 0
    assert culprit in stderr, stderr
    assert "Traceback" not in stderr, stderr
    assert code == 2, stderr


@pytest.mark.slow
def test_nan_loss_keeps_the_last_good_checkpoint_never_best(bad_inputs):
    workdir = bad_inputs["nan_loss"][3]
    with CheckpointManager(workdir / "checkpoints", read_only=True, best_metric="val/loss") as manager:
        steps = manager.all_steps()
        assert steps, "the steps before the blow-up were saved"
        for step in steps:
            manager.verify(step)
            assert all(np.isfinite(x).all() for x in jax.tree.leaves(_plain_params(workdir, step)))
        best = manager.best_step()
        assert best is None or np.isfinite(manager.metrics(best)["val/loss"])


def _plain_params(workdir, step):
    import orbax.checkpoint as ocp

    path = workdir / "checkpoints" / str(step) / "state"
    ckptr = ocp.PyTreeCheckpointer()
    tree = ckptr.metadata(path).item_metadata.tree
    as_numpy = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
    return ckptr.restore(path, args=ocp.args.PyTreeRestore(restore_args=as_numpy))["params"]


# A full disk.

def test_disk_full_during_a_save_is_a_clear_error_and_keeps_earlier_steps(tmp_path, data_dir, monkeypatch, capsys):
    from orbax.checkpoint._src.handlers import json_checkpoint_handler

    original = json_checkpoint_handler.JsonCheckpointHandler._save_fn

    async def save_until_full(self, x, directory):
        if int(directory.parent.name.split(".")[0]) >= 10:  # `<step>.orbax-checkpoint-tmp-*/<item>`
            raise OSError(errno.ENOSPC, "No space left on device")
        return await original(self, x, directory)

    monkeypatch.setattr(json_checkpoint_handler.JsonCheckpointHandler, "_save_fn", save_until_full)
    workdir = tmp_path / "run"
    config = tiny_config(data_dir, **{**SHORT, "checkpoint.every_steps": 5, "checkpoint.async_save": True})
    assert run_or_exit(config, workdir) == 2
    err = capsys.readouterr().err
    assert "disk is full" in err and str(workdir / "checkpoints" / "10") in err and "[5]" in err, err
    monkeypatch.undo()
    assert committed_steps(workdir) == [5] and not list((workdir / "checkpoints").glob("*tmp*"))
    with CheckpointManager(workdir / "checkpoints", read_only=True) as manager:
        manager.verify(5)
    assert issubclass(SaveFailedError, CheckpointSaveError)  # callers of jaxckpt.run can catch either


@pytest.fixture
def small_disk(tmp_path):
    """`tmp_path/run/checkpoints` on a 640 KiB tmpfs (root only; skipped where mounting is refused)."""
    mount = tmp_path / "run" / "checkpoints"
    mount.mkdir(parents=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=640k", "tmpfs", str(mount)], capture_output=True,
                          text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({done.stderr.strip()}); the injected ENOSPC test covers it")
    yield mount.parent
    subprocess.run(["umount", "-l", str(mount)], check=True)


@pytest.mark.slow
def test_real_full_disk_through_the_cli_exits_2_and_keeps_earlier_steps(small_disk, data_dir):
    config = tiny_config(data_dir, **{**SHORT, "checkpoint.every_steps": 1, "checkpoint.max_to_keep": -1})
    done = subprocess.run([sys.executable, str(ROOT / "experiments" / "run.py"), *cli_args(config, small_disk)],
                          cwd=ROOT, env={**os.environ, **CLI_ENV}, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr
    assert "disk is full" in done.stderr and "Traceback" not in done.stderr, done.stderr
    steps = committed_steps(small_disk)
    assert steps and not list((small_disk / "checkpoints").glob("*tmp*"))
    with CheckpointManager(small_disk / "checkpoints", read_only=True) as manager:
        for step in steps:
            manager.verify(step)


# Two runs on one workdir.

@pytest.mark.slow
def test_second_run_is_refused_and_a_killed_holder_leaves_no_stale_lock(tmp_path, data_dir):
    workdir = tmp_path / "run"
    # Never finishes by itself: the test stops it.
    args = cli_args(tiny_config(data_dir, **{"train.num_steps": 10**6, "train.log_every_steps": 50,
                                             "checkpoint.every_steps": 100}), workdir)
    first = Running(args)
    try:
        first.wait_for(r"step 150/")  # step 100 is saved
        second = subprocess.run([sys.executable, str(ROOT / "experiments" / "run.py"), *args], cwd=ROOT,
                                env={**os.environ, **CLI_ENV}, capture_output=True, text=True, timeout=300)
        assert first.proc.poll() is None
        assert second.returncode == 2, second.stderr
        assert f"in use by pid {first.proc.pid}" in second.stderr and "Traceback" not in second.stderr
    finally:
        first.proc.kill()
        first.finish()
    assert "in use" not in (workdir / "train.log").read_text()  # the refused run wrote nothing there
    third = Running(args)
    third.wait_for(r"resuming from this workdir's latest checkpoint, step \d+")
    third.wait_for(r"training steps")
    third.proc.send_signal(signal.SIGTERM)
    assert third.finish() == 75, third.stderr
