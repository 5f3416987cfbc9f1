"""Model-sharded state: `config.mesh` (data x fsdp), checkpoints that move between meshes, device and
process counts, and processes that agree on when to stop.

The end-to-end tests run `experiments/run.py` and a small restore probe in subprocesses with faked
CPU devices (`--xla_force_host_platform_device_count`), and two `jax.distributed` processes over
loopback.
"""

import json
import os
import re
import signal
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from jaxckpt.config_strings import parse_mesh_rules
from jaxckpt.errors import ConfigError
from jaxckpt.runner import mesh as mesh_lib
from tests.preemption_test import CLI_ENV, Running, cli_args, committed_steps, final_params
from tests.runs import ROOT, read_jsonl, run_cli, tiny_config

SHORT = {"train.num_steps": 20, "train.eval_every_steps": 10, "checkpoint.every_steps": 10}


def _devices_env(n: int) -> dict[str, str]:
    return {**CLI_ENV, "XLA_FLAGS": f"--xla_force_host_platform_device_count={n}"}


# --- the mesh and its rules (in this process: tests/conftest.py fakes 4 devices) -------------------------


def test_mesh_axes_multiply_to_the_device_count():
    mesh = mesh_lib.make_mesh(data=2, fsdp=2)
    assert dict(mesh.shape) == {"data": 2, "fsdp": 2}
    assert dict(mesh_lib.make_mesh(fsdp=4).shape) == {"data": 1, "fsdp": 4}  # data=-1: the rest
    assert dict(mesh_lib.make_mesh(data=0, fsdp=2).shape) == {"data": 2, "fsdp": 2}
    assert dict(mesh_lib.make_mesh().shape) == {"data": 4, "fsdp": 1}  # the default: pure data parallel
    with pytest.raises(ConfigError, match=r"mesh.data=2 x mesh.fsdp=4 = 8, but this job has 4 devices"):
        mesh_lib.make_mesh(data=2, fsdp=4)
    with pytest.raises(ConfigError, match=r"mesh.fsdp=3 does not divide the 4 devices"):
        mesh_lib.make_mesh(fsdp=3)


def test_rules_parse_at_the_config_boundary():
    assert parse_mesh_rules("encoder/.*kernel=fsdp,None; .*bias= ;x=data+fsdp") == (
        ("encoder/.*kernel", ("fsdp", None)), (".*bias", ()), ("x", (("data", "fsdp"),)))
    with pytest.raises(ConfigError, match="must look like 'regex=spec'"):
        parse_mesh_rules("encoder/kernel")
    with pytest.raises(TypeError, match="parse it with jaxckpt.config_strings.parse_mesh_rules"):
        mesh_lib.state_shardings(_state(), mesh_lib.make_mesh(), "enc=fsdp")
    with pytest.raises(ConfigError, match="does not compile"):
        mesh_lib.state_shardings(_state(), mesh_lib.make_mesh(), parse_mesh_rules("enc(oder=fsdp"))


def _state():
    params = {"enc": {"kernel": np.zeros((6, 8), np.float32), "bias": np.zeros((6,), np.float32)},
              "head": {"kernel": np.zeros((3, 5), np.float32)}}
    moments = jax.tree.map(lambda x: x, params)
    return {"params": params, "opt_state": {"mu": moments}, "step": np.int32(0), "rng": np.zeros(2, np.uint32)}


def test_default_shards_params_and_moments_along_their_largest_divisible_dimension():
    shardings = mesh_lib.state_shardings(_state(), mesh_lib.make_mesh(data=2, fsdp=2))
    assert shardings["params"]["enc"]["kernel"].spec == P(None, "fsdp")  # 8 > 6, both divisible
    assert shardings["opt_state"]["mu"]["enc"]["kernel"].spec == P(None, "fsdp")
    assert shardings["params"]["enc"]["bias"].spec == P("fsdp")
    assert shardings["params"]["head"]["kernel"].spec == P()  # neither 3 nor 5 divides by 2
    assert shardings["rng"].spec == P() and shardings["step"].spec == P()  # not params: replicated
    replicated = mesh_lib.state_shardings(_state(), mesh_lib.make_mesh())
    assert all(s.spec == P() for s in jax.tree.leaves(replicated))


def test_rules_override_the_default_and_name_what_is_wrong():
    mesh = mesh_lib.make_mesh(data=2, fsdp=2)
    shardings = mesh_lib.state_shardings(_state(), mesh, {"enc/kernel": P("fsdp", None)})
    assert shardings["params"]["enc"]["kernel"].spec == P("fsdp", None)
    assert shardings["opt_state"]["mu"]["enc"]["kernel"].spec == P("fsdp", None)  # searched in every path
    only = mesh_lib.state_shardings(_state(), mesh, parse_mesh_rules("^params/enc/kernel=fsdp,None"))
    assert only["opt_state"]["mu"]["enc"]["kernel"].spec == P(None, "fsdp")
    with pytest.raises(ConfigError, match=r"names axis 'model', which the mesh does not have; its axes are \['data', 'fsdp'\]"):
        mesh_lib.state_shardings(_state(), mesh, {"enc/kernel": P("model")})
    with pytest.raises(ConfigError, match=r"splits dimension 1 of \S*head/kernel \(shape \(3, 5\)\) into 2 parts, which does not divide 5"):
        mesh_lib.state_shardings(_state(), mesh, {"head/kernel": P(None, "fsdp")})
    with pytest.raises(ConfigError, match=r"rule\(s\) \['decoder'\] match no leaf"):
        mesh_lib.state_shardings(_state(), mesh, {"decoder": P("fsdp")})


# --- end to end: 8 faked devices, fsdp=4 x data=2; restores on 1, 2 and 8 devices -------------------------

PROBE = r"""
import json, sys
import jax, numpy as np
from jaxckpt.checkpoint.manager import CheckpointManager
from jaxckpt.runner import distributed
from jaxckpt.runner.setup import abstract_state
from jaxckpt.runner.task import load_task
from jaxckpt.tree import treepath
from tests.runs import tiny_config
data_dir, workdir, step, data, fsdp, out = sys.argv[1:]
config = tiny_config(data_dir, **{"mesh.data": int(data), "mesh.fsdp": int(fsdp)})
task = load_task(config)
mesh = distributed.run_mesh(config)
abstract, _ = abstract_state(task, config, mesh, None)
with CheckpointManager(workdir + "/checkpoints", read_only=True) as manager:
    state = manager.restore(abstract, step=int(step))
flat = treepath.flatten({"params": state.params, "opt_state": state.opt_state})
np.savez(out, **{p.replace("/", "|"): np.asarray(x) for p, x in flat.items()})
print(json.dumps({p: [str(x.sharding.spec), list(x.shape), list(x.addressable_shards[0].data.shape)]
                  for p, x in flat.items()}))
"""


def _probe(data_dir, workdir, step, devices, data, fsdp, out):
    """Restores `workdir`'s step on `devices` faked devices and a data x fsdp mesh; returns (specs, arrays)."""
    done = subprocess.run([sys.executable, "-c", PROBE, str(data_dir), str(workdir), str(step), str(data), str(fsdp),
                           str(out)], cwd=ROOT, env={**os.environ, **_devices_env(devices)}, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    specs = json.loads(done.stdout.strip().splitlines()[-1])
    with np.load(out) as saved:
        arrays = {k.replace("|", "/"): saved[k] for k in saved.files}
    return specs, arrays


def _assert_sharded(specs):
    """Some params really are split: their spec names fsdp and each device holds less than the whole."""
    split = [p for p, (spec, shape, local) in specs.items() if p.startswith("params/") and "fsdp" in spec]
    assert split, specs
    assert all(specs[p][2] != specs[p][1] for p in split), {p: specs[p] for p in split}


def _assert_params_equal(arrays, reference):
    assert sorted(p for p in arrays if p.startswith("params/")) == sorted("params/" + p for p in reference)
    for path, value in reference.items():
        assert np.array_equal(arrays["params/" + path], value), path


@pytest.fixture(scope="module")
def prepared(data_dir):
    """The digits dataset prepared once, before several processes read it."""
    from jaxckpt.runner.task import load_task

    load_task(tiny_config(data_dir))
    return data_dir


@pytest.fixture(scope="module")
def fsdp_run(tmp_path_factory, prepared):
    """A digits run trained by run.py on 8 faked devices with mesh.data=2, mesh.fsdp=4."""
    workdir = tmp_path_factory.mktemp("fsdp")
    config = tiny_config(prepared, **{**SHORT, "mesh.data": 2, "mesh.fsdp": 4})
    done = run_cli(cli_args(config, workdir), env=_devices_env(8))
    assert done.returncode == 0, done.stderr
    assert "mesh 2 data x 4 fsdp: params and optimizer state sharded along fsdp" in done.stderr
    return workdir


def _flatten_params(params):
    from jaxckpt.tree import treepath

    return {p: np.asarray(v) for p, v in treepath.flatten(params).items()}


@pytest.mark.slow
@pytest.mark.parametrize("devices,data,fsdp", [(8, 2, 4), (8, 1, 8), (2, 1, 2), (1, 1, 1)],
                         ids=["8dev-data2-fsdp4", "8dev-fsdp8", "2dev-fsdp2", "1dev"])
def test_fsdp_checkpoint_restores_bitwise_on_other_meshes(tmp_path, data_dir, fsdp_run, devices, data, fsdp):
    step, saved = final_params(fsdp_run)  # read by plain Orbax as numpy
    specs, arrays = _probe(data_dir, fsdp_run, step, devices, data, fsdp, tmp_path / "restored.npz")
    if fsdp > 1:
        _assert_sharded(specs)
        assert any("fsdp" in specs[p][0] for p in specs if p.startswith("opt_state/")), specs
    else:
        assert all("fsdp" not in spec and local == shape for spec, shape, local in specs.values()), specs
    _assert_params_equal(arrays, _flatten_params(saved))


@pytest.mark.slow
@pytest.mark.parametrize("devices,fsdp", [(1, 1), (8, 8)], ids=["1dev", "8dev-fsdp8"])
def test_fsdp_run_evaluates_on_other_meshes(tmp_path, data_dir, fsdp_run, devices, fsdp):
    logged = [p for p in read_jsonl(fsdp_run / "metrics.jsonl") if p["split"] == "val" and p["step"] == 20][0]
    config = tiny_config(data_dir, **{**SHORT, "run_type": "val", "checkpoint.resume_file": str(fsdp_run),
                                      "mesh.fsdp": fsdp})
    done = run_cli(cli_args(config, tmp_path / "eval"), env=_devices_env(devices))
    assert done.returncode == 0, done.stderr
    evaluated = json.loads((tmp_path / "eval" / "eval_val_20.json").read_text())
    assert evaluated["accuracy"] == pytest.approx(logged["accuracy"], rel=1e-6)
    assert evaluated["loss"] == pytest.approx(logged["loss"], rel=1e-5)


# --- two processes x 4 devices, fsdp over both hosts ---------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _two_processes(args, devices_each):
    """`run.py ARGS` as processes 0 and 1 of one job over loopback; returns their `Running`s."""
    coordinator = f"--coordinator_address=127.0.0.1:{_free_port()}"
    env = _devices_env(devices_each)
    return [Running([*args, coordinator, "--num_processes=2", f"--process_id={i}"], env=env) for i in range(2)]


@pytest.mark.slow
def test_two_processes_shard_over_hosts_and_one_process_continues(tmp_path, prepared):
    data_dir = prepared
    workdir = tmp_path / "run"
    config = tiny_config(data_dir, **{**SHORT, "mesh.fsdp": 8})
    runs = _two_processes(cli_args(config, workdir), devices_each=4)
    codes = [r.finish(timeout=300) for r in runs]
    assert codes == [0, 0], "\n".join(r.stderr for r in runs)
    assert "mesh 1 data x 8 fsdp" in runs[0].stderr
    state = workdir / "checkpoints" / "20" / "state"
    assert sorted(p.name for p in state.glob("ocdbt.process_*")) == ["ocdbt.process_0", "ocdbt.process_1"]
    record = json.loads((state / "_METADATA").read_text())["custom_metadata"]["jaxckpt"]
    shards = record["shards"]  # every array split over both hosts has every shard hashed
    assert "params/encoder/Dense_0/kernel" in shards and "opt_state/0/mu/encoder/Dense_0/kernel" in shards
    assert all(len(r["xxh3_64"]) == 8 and len(set(map(str, r["index"]))) == 8 for r in shards.values())
    assert set(record["arrays"]).isdisjoint(shards)

    # One process, one device: the params equal what plain Orbax reads, bit for bit.
    step, saved = final_params(workdir)
    _, arrays = _probe(data_dir, workdir, step, 1, 1, 1, tmp_path / "one.npz")
    _assert_params_equal(arrays, _flatten_params(saved))
    more = run_cli(cli_args(tiny_config(data_dir, **{**SHORT, "train.num_steps": 30}), workdir), env=CLI_ENV)
    assert more.returncode == 0, more.stderr
    assert "resuming from this workdir's latest checkpoint, step 20" in more.stderr
    assert committed_steps(workdir)[-1] == 30


def test_a_flipped_byte_in_one_shard_is_found(tmp_path):
    from jaxckpt.checkpoint import shard_checksums

    full = np.arange(32, dtype=np.float32).reshape(8, 4)
    record = {"w": {"index": [[[0, 4], [0, 4]], [[4, 8], [0, 4]]],
                    "xxh3_64": [shard_checksums._xxh3(full[:4]), shard_checksums._xxh3(full[4:])],
                    "dtype": "float32", "shape": [8, 4]}}
    assert shard_checksums.mismatched(record, {"w": full}) == []
    damaged = full.copy()
    damaged[6, 1] = -1
    assert shard_checksums.mismatched(record, {"w": damaged}) == ["w"]


# --- processes that agree: only one gets the signal; both stop at the same step -------------------------------

AGREE = {"train.num_steps": 600, "train.log_every_steps": 50, "train.eval_every_steps": 300,
         "checkpoint.every_steps": 300}


@pytest.mark.slow
def test_a_signal_to_one_process_stops_both_at_one_step_and_the_rerun_matches(tmp_path, prepared):
    data_dir = prepared
    config = tiny_config(data_dir, **AGREE)
    reference = tmp_path / "reference"
    runs = _two_processes(cli_args(config, reference), devices_each=1)
    assert [r.finish(timeout=300) for r in runs] == [0, 0], "\n".join(r.stderr for r in runs)

    workdir = tmp_path / "run"
    args = cli_args(config, workdir)
    runs = _two_processes(args, devices_each=1)
    runs[0].wait_for(r"step 50/")  # process 0 logs progress; both are in the loop (steps are collective)
    runs[1].proc.send_signal(signal.SIGTERM)  # process 1 only; process 0 never sees a signal
    codes = [r.finish(timeout=120) for r in runs]
    assert codes == [75, 75], "\n".join(r.stderr for r in runs)
    stopped = [int(re.search(r"after saving step (\d+)", r.stderr).group(1)) for r in runs]
    assert stopped[0] == stopped[1] and 50 <= stopped[0] < AGREE["train.num_steps"], stopped
    assert committed_steps(workdir) == [stopped[0]]

    runs = _two_processes(args, devices_each=1)
    assert [r.finish(timeout=300) for r in runs] == [0, 0], "\n".join(r.stderr for r in runs)
    assert f"resuming from this workdir's latest checkpoint, step {stopped[0]}" in runs[0].stderr
    step, params = final_params(workdir)
    ref_step, ref_params = final_params(reference)
    assert step == ref_step == AGREE["train.num_steps"]
    assert all(jax.tree.leaves(jax.tree.map(np.array_equal, params, ref_params)))
    assert read_jsonl(workdir / "metrics.jsonl") == read_jsonl(reference / "metrics.jsonl")


def test_load_params_onto_a_sharded_target_keeps_its_shardings(tmp_path):
    from jaxckpt.checkpoint.manager import CheckpointManager
    from jaxckpt.weights.pretrained import load_params

    params = {"enc": {"kernel": np.arange(48, dtype=np.float32).reshape(6, 8)}, "head": {"bias": np.ones(3, np.float32)}}
    with CheckpointManager(tmp_path / "checkpoints", async_save=False) as manager:
        manager.save(1, {"params": params, "step": np.int32(1)})
    mesh = mesh_lib.make_mesh(data=1, fsdp=4)
    shardings = mesh_lib.state_shardings(params, mesh, prefix="params/")
    target = mesh_lib.with_shardings(params, shardings)
    loaded, report = load_params(tmp_path / "checkpoints", target)
    kernel = loaded["enc"]["kernel"]
    assert kernel.sharding.spec == P(None, "fsdp") and kernel.addressable_shards[0].data.shape == (6, 2)
    assert np.array_equal(np.asarray(kernel), params["enc"]["kernel"])
    assert loaded["head"]["bias"].sharding.spec == P()


@pytest.mark.slow
def test_a_process_that_dies_does_not_leave_the_other_waiting(tmp_path, prepared):
    import time

    config = tiny_config(prepared, **{**AGREE, "train.num_steps": 100_000})
    runs = _two_processes(cli_args(config, tmp_path / "run"), devices_each=1)
    runs[0].wait_for(r"step 50/")
    runs[1].proc.kill()
    killed = time.monotonic()
    code = runs[0].finish(timeout=240)  # the step's collective fails; the heartbeat ends the shutdown
    assert code != 0 and time.monotonic() - killed < 200, runs[0].stderr[-3000:]
    assert "Gloo AllGather failed" in runs[0].stderr or "heartbeat" in runs[0].stderr, runs[0].stderr[-3000:]


@pytest.mark.slow
def test_fsdp_run_saved_by_one_process_evaluates_on_two(tmp_path, fsdp_run, prepared):
    logged = [p for p in read_jsonl(fsdp_run / "metrics.jsonl") if p["split"] == "val" and p["step"] == 20][0]
    config = tiny_config(prepared, **{**SHORT, "run_type": "val", "checkpoint.resume_file": str(fsdp_run),
                                      "mesh.fsdp": 8})
    runs = _two_processes(cli_args(config, tmp_path / "eval"), devices_each=4)
    assert [r.finish(timeout=300) for r in runs] == [0, 0], "\n".join(r.stderr for r in runs)
    evaluated = json.loads((tmp_path / "eval" / "eval_val_20.json").read_text())
    assert evaluated["accuracy"] == pytest.approx(logged["accuracy"], rel=1e-6)
    assert evaluated["loss"] == pytest.approx(logged["loss"], rel=1e-5)


@pytest.mark.slow
def test_two_processes_predict_what_one_predicts(tmp_path, fsdp_run, prepared):
    config = tiny_config(prepared, **{**SHORT, "run_type": "predict", "checkpoint.resume_file": str(fsdp_run),
                                      "mesh.fsdp": 8})
    runs = _two_processes(cli_args(config, tmp_path / "two"), devices_each=4)
    assert [r.finish(timeout=300) for r in runs] == [0, 0], "\n".join(r.stderr for r in runs)
    one = run_cli(cli_args(config, tmp_path / "one"), env=_devices_env(8))
    assert one.returncode == 0, one.stderr
    two_rows = (tmp_path / "two" / "predictions.csv").read_text().splitlines()
    one_rows = (tmp_path / "one" / "predictions.csv").read_text().splitlines()
    assert len(two_rows) > 100 and [r.split(",")[:2] for r in two_rows] == [r.split(",")[:2] for r in one_rows]
