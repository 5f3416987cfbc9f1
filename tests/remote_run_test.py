"""`experiments/run.py --workdir gs://…` and `s3://…` end to end, on the emulators of tests/object_store.py.

A run killed with SIGKILL while it saves: the half-written step is never resumed from, a rerun is
refused while the dead run's lease lasts, then takes the lock over and ends bitwise where an
uninterrupted local run ends; plain Orbax reads its state item. Then val and predict on the URL,
and a local run evaluating the URL run through `checkpoint.resume_file`. Two processes training an
fsdp-sharded state into a bucket, each writing its own shards, and one process continuing it.
"""

import json
import re
import signal
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from jaxckpt.checkpoint import orbax_s3, storage
from tests.preemption_test import CLI_ENV, Running, cli_args, uninterrupted_run
from tests.runs import run_cli, tiny_config

NUM_STEPS = 300
TRAIN = {"train.num_steps": NUM_STEPS, "train.log_every_steps": 50, "train.eval_every_steps": 150,
         "checkpoint.every_steps": 150}
LEASE_S = 20  # long enough that the refused rerun starts before it ends, even on a loaded machine


@pytest.fixture(params=["gcs_emulator", "s3_emulator"])
def url(request):
    """A fresh run directory URL on each store (not `node.name`: fsspec globs its brackets)."""
    return f"{request.getfixturevalue(request.param)}/runs/{request.node.originalname}"


@pytest.fixture(scope="module")
def reference(tmp_path_factory, data_dir):
    """One uninterrupted local run, the one the run killed on a bucket must end equal to."""
    return uninterrupted_run(tmp_path_factory.mktemp("reference"), data_dir, TRAIN)


def _steps(workdir, *, committed: bool) -> list[int]:
    checkpoints = storage.run_path(workdir) / "checkpoints"
    if not checkpoints.is_dir():
        return []
    steps = [p for p in checkpoints.iterdir() if p.name.isdigit()]
    return sorted(int(p.name) for p in steps if (p / "commit_success.txt").exists() == committed)


def _final(workdir) -> tuple[int, dict]:
    """The latest committed step's params, read with plain Orbax as numpy."""
    step = _steps(workdir, committed=True)[-1]
    path = storage.run_path(workdir) / "checkpoints" / str(step) / "state"
    with orbax_s3.orbax_s3():  # plain Orbax 0.12.8 needs it on s3:// (README, "Object storage")
        ckptr = ocp.PyTreeCheckpointer()
        tree = ckptr.metadata(path).item_metadata.tree
        as_numpy = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
        return step, ckptr.restore(path, args=ocp.args.PyTreeRestore(restore_args=as_numpy))["params"]


def _points(workdir) -> list[dict]:
    text = (storage.run_path(workdir) / "metrics.jsonl").read_text()
    return [json.loads(line) for line in text.splitlines() if line.strip()]


@pytest.mark.slow
def test_sigkill_mid_save_on_a_bucket_then_takeover_and_the_same_run(url, data_dir, reference):
    # A save at every step, in the background: a kill after a commit lands while the next is written.
    killed = tiny_config(data_dir, **{**TRAIN, "checkpoint.every_steps": 1, "checkpoint.async_save": True,
                                      "checkpoint.max_to_keep": 2, "checkpoint.lock_lease_s": LEASE_S})
    run = Running(cli_args(killed, url))
    deadline = time.monotonic() + 180
    while not (_steps(url, committed=True) and _steps(url, committed=False)):
        assert run.proc.poll() is None, f"run.py exited before a save was in flight:\n{run.stderr}"
        assert time.monotonic() < deadline, run.stderr
        time.sleep(0.02)
    run.proc.kill()
    assert run.finish() == -signal.SIGKILL
    committed, half = _steps(url, committed=True), _steps(url, committed=False)
    assert half, "the kill did not land during a save"
    assert (storage.as_path(url) / ".lock").exists(), "a killed run cannot release its lock"

    # While the dead run's lease lasts, a rerun is refused, naming the holder; nothing is written.
    args = cli_args(tiny_config(data_dir, **{**TRAIN, "checkpoint.lock_lease_s": LEASE_S}), url)
    refused = run_cli(args, env=CLI_ENV)
    assert refused.returncode == 2, refused.stderr
    assert "is in use by" in refused.stderr and "Traceback" not in refused.stderr
    left = re.search(r"lease ends in (\d+) s", refused.stderr)
    assert left, refused.stderr

    time.sleep(int(left.group(1)) + 1)
    done = run_cli(args, env=CLI_ENV)
    assert done.returncode == 0, done.stderr
    assert "took over the lock of workdir" in done.stderr
    assert f"resuming from this workdir's latest checkpoint, step {committed[-1]}" in done.stderr
    assert "corrupt" not in done.stderr and "Traceback" not in done.stderr
    assert not _steps(url, committed=False), "the half-written step is removed"
    assert not (storage.as_path(url) / ".lock").exists()

    step, params = _final(url)
    ref_step, ref_params = _final(reference)
    assert step == ref_step == NUM_STEPS
    assert all(jax.tree.leaves(jax.tree.map(np.array_equal, params, ref_params))), "params differ"
    assert _points(url) == _points(reference)


@pytest.mark.slow
def test_val_and_predict_on_a_bucket_and_a_local_run_evaluating_it(url, data_dir, tmp_path):
    short = {"train.num_steps": 20, "train.eval_every_steps": 10, "checkpoint.every_steps": 10}
    assert run_cli(cli_args(tiny_config(data_dir, **short), url), env=CLI_ENV).returncode == 0
    val = run_cli(cli_args(tiny_config(data_dir, **{**short, "run_type": "val"}), url), env=CLI_ENV)
    assert val.returncode == 0, val.stderr
    evaluated = json.loads((storage.as_path(url) / "eval_val_20.json").read_text())
    logged = [p for p in _points(url) if p["split"] == "val" and p["step"] == 20][0]
    assert evaluated["accuracy"] == pytest.approx(logged["accuracy"], rel=1e-6)

    predict = run_cli(cli_args(tiny_config(data_dir, **{**short, "run_type": "predict"}), url), env=CLI_ENV)
    assert predict.returncode == 0, predict.stderr
    rows = (storage.as_path(url) / "predictions.csv").read_text().splitlines()
    assert len(rows) > 10 and "wrote" in predict.stderr

    local = tmp_path / "eval"
    config = tiny_config(data_dir, **{**short, "run_type": "test", "checkpoint.resume_file": url})
    test = run_cli(cli_args(config, local), env=CLI_ENV)
    assert test.returncode == 0, test.stderr
    assert json.loads((local / "eval_test_20.json").read_text())["accuracy"] > 0


@pytest.mark.slow
def test_two_processes_train_fsdp_on_a_bucket_and_one_process_continues(gcs_emulator, data_dir):
    from tests.sharding_test import SHORT, _two_processes

    url = f"{gcs_emulator}/runs/two_processes_fsdp"
    runs = _two_processes(cli_args(tiny_config(data_dir, **{**SHORT, "mesh.fsdp": 4}), url), devices_each=2)
    codes = [r.finish(timeout=300) for r in runs]
    assert codes == [0, 0], "\n".join(r.stderr for r in runs)
    assert "mesh 1 data x 4 fsdp" in runs[0].stderr
    state = storage.as_path(url) / "checkpoints" / "20" / "state"
    assert sorted(p.name for p in state.glob("ocdbt.process_*")) == ["ocdbt.process_0", "ocdbt.process_1"]
    assert not (storage.as_path(url) / ".lock").exists()

    more = run_cli(cli_args(tiny_config(data_dir, **{**SHORT, "train.num_steps": 30}), url), env=CLI_ENV)
    assert more.returncode == 0, more.stderr
    assert "resuming from this workdir's latest checkpoint, step 20" in more.stderr
    assert _steps(url, committed=True)[-1] == 30
