"""Topology changes: two `jax.distributed` processes save one run; one process on one device restores it."""

import json
import os
import socket
import subprocess
import sys

import pytest

import jaxckpt
from jaxckpt.checkpoint.manager import CheckpointManager
from tests.preemption_test import CLI_ENV, cli_args
from tests.runs import ROOT, read_jsonl, run_cli, tiny_config

SHORT = {"train.num_steps": 20, "train.eval_every_steps": 10, "checkpoint.every_steps": 10}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_two_processes(config, workdir):
    """`run.py` as processes 0 and 1 of one job over loopback (gloo collectives on CPU)."""
    coordinator = f"--coordinator_address=127.0.0.1:{_free_port()}"
    procs = [subprocess.Popen([sys.executable, str(ROOT / "experiments" / "run.py"), *cli_args(config, workdir),
                               coordinator, "--num_processes=2", f"--process_id={i}"], cwd=ROOT,
                              env={**os.environ, **CLI_ENV}, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                              text=True) for i in range(2)]
    try:
        return [(p.communicate(timeout=240)[1], p.returncode) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()


@pytest.mark.slow
def test_two_processes_save_one_run_that_one_process_restores(tmp_path, data_dir, four_device_run):
    # One device per process, so the 2-device run and the 1-device restore differ in topology.
    workdir = tmp_path / "run"
    (err0, code0), (err1, code1) = _run_two_processes(tiny_config(data_dir, **SHORT), workdir)
    assert code0 == 0 and code1 == 0, f"process 0:\n{err0}\nprocess 1:\n{err1}"
    assert "training steps 1..20 (batch 32, 2 device(s))" in err0
    # Only process 0 writes the log and metrics; the other logs to its own stderr.
    log = (workdir / "train.log").read_text()
    assert log.count("training steps 1..20") == 1
    assert [(p["step"], p["split"]) for p in read_jsonl(workdir / "metrics.jsonl")] == [
        (10, "train"), (10, "val"), (20, "train"), (20, "val")]
    assert sorted(p.name for p in (workdir / "checkpoints" / "20" / "state").glob("ocdbt.process_*")) == [
        "ocdbt.process_0", "ocdbt.process_1"]
    with CheckpointManager(workdir / "checkpoints", read_only=True) as manager:
        assert manager.all_steps() == [10, 20]
        assert manager.checksums(20), "replicated arrays must be checksummed in multi-process runs"
        manager.verify(20)

    # One process, one device: evaluate it, then continue training it in place.
    val = run_cli(cli_args(tiny_config(data_dir, **{**SHORT, "run_type": "val",
                                                    "checkpoint.resume_file": str(workdir)}), tmp_path / "eval"),
                  env=CLI_ENV)
    assert val.returncode == 0, val.stderr
    logged = [p for p in read_jsonl(workdir / "metrics.jsonl") if p["split"] == "val" and p["step"] == 20][0]
    evaluated = json.loads((tmp_path / "eval" / "eval_val_20.json").read_text())
    assert evaluated["accuracy"] == pytest.approx(logged["accuracy"], rel=1e-6)
    assert evaluated["loss"] == pytest.approx(logged["loss"], rel=1e-5)
    more = run_cli(cli_args(tiny_config(data_dir, **{**SHORT, "train.num_steps": 30}), workdir), env=CLI_ENV)
    assert more.returncode == 0, more.stderr
    assert "resuming from this workdir's latest checkpoint, step 20" in more.stderr


@pytest.fixture(scope="module")
def four_device_run(tmp_path_factory, data_dir):
    """A run trained in this process on the 4 devices tests/conftest.py fakes (it also prepares the data)."""
    import jax

    assert jax.device_count() == 4
    workdir = tmp_path_factory.mktemp("four")
    jaxckpt.run(tiny_config(data_dir, **SHORT), workdir)
    return workdir


@pytest.mark.slow
def test_state_saved_on_four_devices_restores_on_one(data_dir, four_device_run):
    workdir = four_device_run
    assert "(batch 32, 4 device(s))" in (workdir / "train.log").read_text()
    logged = [p for p in read_jsonl(workdir / "metrics.jsonl") if p["split"] == "val" and p["step"] == 20][0]
    val = run_cli(cli_args(tiny_config(data_dir, **{**SHORT, "run_type": "val"}), workdir), env=CLI_ENV)
    assert val.returncode == 0, val.stderr
    assert "resuming from this workdir's latest checkpoint, step 20" in val.stderr
    evaluated = json.loads((workdir / "eval_val_20.json").read_text())
    assert evaluated["accuracy"] == pytest.approx(logged["accuracy"], rel=1e-6)
    assert evaluated["loss"] == pytest.approx(logged["loss"], rel=1e-5)
