"""Stopping a real `experiments/run.py` process: SIGTERM/SIGINT save and exit 75; SIGKILL at any moment.

Every interrupted run is rerun with the same command and must end bitwise where an uninterrupted
run ends, with the same metrics.jsonl.
"""

import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from experiments.configs import digits
from tests.runs import ROOT, read_jsonl, run_cli, tiny_config

# Long enough that a signal sent at step 50 lands mid-training (about 2 s of steps on 2 CPU cores).
NUM_STEPS = 1000
TRAIN = {"train.num_steps": NUM_STEPS, "train.log_every_steps": 50, "train.eval_every_steps": 500,
         "checkpoint.every_steps": 500}


# Subprocesses share compiled programs through JAX's persistent cache: it halves their start-up.
CLI_ENV = {"XLA_FLAGS": "", "JAX_PLATFORMS": "cpu",
           "JAX_COMPILATION_CACHE_DIR": os.path.join(tempfile.gettempdir(), f"jaxckpt-tests-xla-{os.getuid()}"),
           "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0", "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}


def cli_args(config, workdir) -> list[str]:
    """`run.py` arguments that build `config` from the digits config file (only the changed keys)."""
    default = _flat(digits.get_config().to_dict())
    changed = {k: v for k, v in _flat(config.to_dict()).items() if default.get(k) != v}
    args = ["--config", str(ROOT / "experiments" / "configs" / "digits.py"), f"--workdir={workdir}"]
    return args + [f"--config.{k}={v}" for k, v in sorted(changed.items())]


def _flat(tree, prefix=""):
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


class Running:
    """A `run.py` subprocess whose stderr is read line by line, so a test can act on a log line."""

    def __init__(self, args: list[str], env: dict[str, str] | None = None):
        env = {**os.environ, **(env or CLI_ENV)}
        self.proc = subprocess.Popen([sys.executable, str(ROOT / "experiments" / "run.py"), *args], cwd=ROOT,
                                     env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        self.lines: list[str] = []
        self._seen = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self):
        for line in self.proc.stderr:
            with self._seen:
                self.lines.append(line)
                self._seen.notify_all()
        with self._seen:
            self._seen.notify_all()

    def wait_for(self, pattern: str, timeout: float = 120) -> None:
        """Blocks until a stderr line matches `pattern`; fails if the process ends first."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        with self._seen:
            while not any(regex.search(line) for line in self.lines):
                if self.proc.poll() is not None and not self._reader.is_alive():
                    pytest.fail(f"run.py exited ({self.proc.returncode}) before logging {pattern!r}:\n{self.stderr}")
                if time.monotonic() > deadline:
                    pytest.fail(f"no {pattern!r} in {timeout}s:\n{self.stderr}")
                self._seen.wait(0.5)

    def finish(self, timeout: float = 120) -> int:
        code = self.proc.wait(timeout)
        self._reader.join(timeout)
        return code

    @property
    def stderr(self) -> str:
        return "".join(self.lines)


def final_params(workdir):
    """The latest step's params, read with plain Orbax as numpy."""
    checkpoints = workdir / "checkpoints"
    step = max(int(p.name) for p in checkpoints.iterdir() if p.name.isdigit())
    path = checkpoints / str(step) / "state"
    ckptr = ocp.PyTreeCheckpointer()
    tree = ckptr.metadata(path).item_metadata.tree
    as_numpy = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
    return step, ckptr.restore(path, args=ocp.args.PyTreeRestore(restore_args=as_numpy))["params"]


def assert_same_run(workdir, reference):
    step, params = final_params(workdir)
    ref_step, ref_params = final_params(reference)
    assert step == ref_step == NUM_STEPS
    chex_equal = jax.tree.map(np.array_equal, params, ref_params)
    assert all(jax.tree.leaves(chex_equal)), f"params differ from the uninterrupted run: {chex_equal}"
    assert read_jsonl(workdir / "metrics.jsonl") == read_jsonl(reference / "metrics.jsonl")


def committed_steps(workdir) -> list[int]:
    checkpoints = workdir / "checkpoints"
    return sorted(int(p.name) for p in checkpoints.iterdir() if p.name.isdigit()) if checkpoints.exists() else []


def leftovers(workdir) -> list[str]:
    return sorted(p.name for p in (workdir / "checkpoints").glob("*.orbax-checkpoint-tmp*"))


def uninterrupted_run(workdir, data_dir, train: dict):
    """`run.py` trained once without interruption into `workdir` (it also prepares the dataset)."""
    done = run_cli(cli_args(tiny_config(data_dir, **train), workdir), env=CLI_ENV)
    assert done.returncode == 0, done.stderr
    return workdir


@pytest.fixture(scope="module")
def reference(tmp_path_factory, data_dir):
    """One uninterrupted run, the one every interrupted run must end equal to."""
    return uninterrupted_run(tmp_path_factory.mktemp("reference"), data_dir, TRAIN)


@pytest.mark.slow
@pytest.mark.parametrize("signum, async_save", [(signal.SIGTERM, False), (signal.SIGINT, False), (signal.SIGTERM, True)],
                         ids=["SIGTERM", "SIGINT", "SIGTERM-async"])
def test_signal_saves_exits_75_and_rerun_matches(tmp_path, data_dir, reference, signum, async_save):
    # async_save=True is the default: the saves in flight when the signal comes are committed too.
    workdir = tmp_path / "run"
    args = cli_args(tiny_config(data_dir, **{**TRAIN, "checkpoint.async_save": async_save}), workdir)
    run = Running(args)
    run.wait_for(r"step 50/")
    run.proc.send_signal(signum)
    assert run.finish() == 75, run.stderr
    stopped = re.search(rf"stopped by {signal.Signals(signum).name} after saving step (\d+)", run.stderr)
    assert stopped, run.stderr
    assert "Traceback" not in run.stderr
    step = int(stopped.group(1))
    assert 50 <= step < NUM_STEPS
    assert committed_steps(workdir)[-1] == step and not leftovers(workdir)  # committed before exiting

    rerun = run_cli(args, env=CLI_ENV)
    assert rerun.returncode == 0, rerun.stderr
    assert f"resuming from this workdir's latest checkpoint, step {step}" in rerun.stderr
    assert_same_run(workdir, reference)


# (what to wait for, seconds after it): a log line while restoring or compiling, or a newly committed
# step, after which the next background save is being written.
KILLS = [("start: ", 0.0), ("training steps", 0.0), (None, 0.0), (None, 0.04), (None, 0.11), (None, 0.23)]


def _wait_for_new_step(run, workdir, after, timeout=120):
    deadline = time.monotonic() + timeout
    while not committed_steps(workdir) or (after is not None and committed_steps(workdir)[-1] <= after):
        assert run.proc.poll() is None, f"run.py exited before saving a step:\n{run.stderr}"
        assert time.monotonic() < deadline, f"no new step in {timeout}s:\n{run.stderr}"
        time.sleep(0.01)


@pytest.mark.slow
def test_sigkill_at_any_moment_resumes_from_the_latest_complete_step(tmp_path, data_dir, reference):
    workdir = tmp_path / "run"
    # A save at every step, in the background: a kill after a commit lands while the next is written.
    killed = tiny_config(data_dir, **{**TRAIN, "checkpoint.every_steps": 1, "checkpoint.async_save": True,
                                      "checkpoint.max_to_keep": 2})
    expected, mid_save = None, 0
    for pattern, delay in KILLS:
        run = Running(cli_args(killed, workdir))
        if pattern is None:
            _wait_for_new_step(run, workdir, after=expected)
        else:
            run.wait_for(pattern)
        time.sleep(delay)
        run.proc.kill()
        assert run.finish() == -signal.SIGKILL
        start = ("fresh start" if expected is None else
                 f"resuming from this workdir's latest checkpoint, step {expected}")
        assert start in run.stderr, run.stderr
        assert "corrupt" not in run.stderr and "Traceback" not in run.stderr
        mid_save += bool(leftovers(workdir))
        steps = committed_steps(workdir)
        expected = steps[-1] if steps else None
    assert mid_save >= 1, "no kill landed during a save; the timings above no longer exercise it"

    # The last leg saves rarely, only to keep the test fast: the save cadence does not enter the
    # computation, so the result must still equal the reference bit for bit.
    done = run_cli(cli_args(tiny_config(data_dir, **{**TRAIN, "checkpoint.async_save": True}), workdir), env=CLI_ENV)
    assert done.returncode == 0, done.stderr
    assert f"resuming from this workdir's latest checkpoint, step {expected}" in done.stderr
    assert not leftovers(workdir) and not (workdir / "checkpoints" / "corrupt").exists()
    assert_same_run(workdir, reference)
