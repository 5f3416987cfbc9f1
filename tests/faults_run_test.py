"""A run resuming while its disk fails below Python (the `tests.faults` shim): nothing is moved, and a
rerun once the fault is gone resumes from the same step."""

import concurrent.futures
import os
import shutil
import subprocess
import sys

import pytest

import jaxckpt
from tests import faults
from tests.preemption_test import CLI_ENV, cli_args, committed_steps
from tests.runs import ROOT, tiny_config

pytestmark = pytest.mark.slow

SHORT = {"train.num_steps": 20, "train.eval_every_steps": 10, "checkpoint.every_steps": 10}
ERRNOS = ("EIO", "EMFILE", "ENFILE", "ENOMEM", "EACCES")


@pytest.fixture(scope="module")
def failed_resumes(tmp_path_factory, data_dir):
    """Each errno: a finished 20-step run resumed to 30 steps while every read of its arrays fails."""
    source = tmp_path_factory.mktemp("source")
    jaxckpt.run(tiny_config(data_dir, **SHORT), source)
    root = tmp_path_factory.mktemp("resumes")

    def resume(name):
        workdir = shutil.copytree(source, root / name, ignore=shutil.ignore_patterns(".lock"))
        args = cli_args(tiny_config(data_dir, **{**SHORT, "train.num_steps": 30}), workdir)
        env = {**os.environ, **CLI_ENV, **faults.env("/state/d/", op="read", errno=name, log=root / f"{name}.log")}
        done = subprocess.run([sys.executable, str(ROOT / "experiments" / "run.py"), *args], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=300)
        return name, (done, workdir, faults.injected(root / f"{name}.log"))

    with concurrent.futures.ThreadPoolExecutor(2) as pool:  # two at a time: CI has two cores
        return dict(pool.map(resume, ERRNOS))


@pytest.mark.parametrize("name", ERRNOS)
def test_a_read_error_on_resume_fails_cleanly_and_a_rerun_resumes(failed_resumes, data_dir, name):
    done, workdir, injected = failed_resumes[name]
    assert injected, "the shim never fired"
    assert done.returncode == 2, done.stderr[-3000:]
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("jaxckpt: error: Cannot read the arrays of step 20 at "), done.stderr[-3000:]
    assert f"{name} (" in last and str(workdir / "checkpoints" / "20") in last and "Nothing was moved" in last
    assert "Traceback" not in done.stderr
    # Every step in place, none set aside, nothing new.
    assert committed_steps(workdir) == [10, 20]
    assert not (workdir / "checkpoints" / "corrupt").exists()
    assert not (workdir / ".lock").exists()
    state = jaxckpt.run(tiny_config(data_dir, **{**SHORT, "train.num_steps": 30}), workdir)
    assert int(state.step) == 30
    assert "resuming from this workdir's latest checkpoint, step 20" in (workdir / "train.log").read_text()
