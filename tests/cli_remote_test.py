"""The command line, pretrained sources and the follower on `gs://` and `s3://` run directories.

The emulators come from tests/object_store.py (registered in conftest.py). The first tests need no
checkpoint on a URL: path resolution, commit markers and the clear refusals of what stays local.
The others save a small run with `CheckpointManager` straight to the store and read it back
through `inspect`, `verify`, `plan`, `export`, `zoo publish` and pretrained loading.
"""

import json
import os

import ml_collections
import numpy as np
import pytest
from cli_test import _CONFIG, _TASK  # the task module and config file the local CLI tests plan with

from jaxckpt.checkpoint import storage
from jaxckpt.checkpoint.manager import CheckpointManager
from jaxckpt.cli import commands as cli
from jaxckpt.errors import CheckpointNotFoundError, UserError
from jaxckpt.runner import follow as follower
from jaxckpt.weights import foreign, zoo
from jaxckpt.weights.pretrained import load_params, resolve_checkpoint_path, resolve_step_dir


@pytest.fixture(params=["gcs_emulator", "s3_emulator"])
def store_url(request):
    """A fresh directory URL on each store, per test (not `node.name`: fsspec globs its brackets)."""
    return f"{request.getfixturevalue(request.param)}/cli/{request.node.originalname}"


def _fake_step(checkpoint_dir: str, step: int, *, committed: bool) -> None:
    """The objects resolution looks at: a state item, and the commit marker Orbax writes last on a URL."""
    storage.write_bytes_atomic(f"{checkpoint_dir}/{step}/state/_METADATA", b"{}")
    if committed:
        storage.write_bytes_atomic(f"{checkpoint_dir}/{step}/commit_success.txt", b"ok")


def test_a_url_resolves_to_its_committed_steps_only(store_url):
    run = f"{store_url}/run"
    _fake_step(f"{run}/checkpoints", 10, committed=True)
    _fake_step(f"{run}/checkpoints", 20, committed=False)  # a save in progress, written in place
    checkpoint_dir, step = resolve_checkpoint_path(run)
    assert (str(checkpoint_dir), step) == (f"{run}/checkpoints", None)
    assert str(resolve_step_dir(run)) == f"{run}/checkpoints/10"
    assert str(resolve_step_dir(f"{run}/checkpoints/10/state")) == f"{run}/checkpoints/10"
    assert follower.committed_steps(checkpoint_dir) == [10]
    with pytest.raises(CheckpointNotFoundError, match="commit_success.txt: its save is still running"):
        resolve_checkpoint_path(f"{run}/checkpoints/20")
    with pytest.raises(CheckpointNotFoundError, match=r"checkpoint.resume_file=.*/nothing: checkpoint path .* does not"):
        resolve_checkpoint_path(f"{store_url}/nothing", key="checkpoint.resume_file")
    assert str(zoo.resolve(f"{run}/checkpoints/../checkpoints")) == f"{run}/checkpoints"


def test_cli_names_a_missing_url(store_url, capsys):
    for command in ("inspect", "verify"):
        assert cli.main([command, f"{store_url}/nothing"]) == 2
        err = capsys.readouterr().err
        assert f"{store_url}/nothing does not exist" in err and "Traceback" not in err


@pytest.mark.parametrize("command", [["inspect"], ["verify"], ["export", "--step", "1"], ["follow"]])
def test_cli_refuses_other_url_schemes(command, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = [command[0], "https://example.com/run", *command[1:]]
    if command[0] == "export":
        args.insert(2, str(tmp_path / "out.safetensors"))
    assert cli.main(args) == 2
    assert "'https://example.com/run' is not a gs:// or s3:// URL" in capsys.readouterr().err
    assert os.listdir(tmp_path) == []


def test_what_stays_local_is_refused_in_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("JAXCKPT_ZOO", "gs://bucket/zoo")
    with pytest.raises(UserError, match=r"JAXCKPT_ZOO=gs://bucket/zoo is a URL, but the zoo is a local folder"):
        zoo.zoo_dir()
    monkeypatch.delenv("JAXCKPT_ZOO")
    with pytest.raises(UserError, match=r"gs://b/bert.safetensors is a URL, but weights files .* local disk; copy"):
        load_params("gs://b/bert.safetensors", {"w": np.zeros(2)})
    with pytest.raises(UserError, match=r"s3://b/m.pt is a URL, but weights files"):
        foreign.read_foreign("s3://b/m.pt")
    assert cli.main(["inspect", "hf:gs://b/bert"]) == 2
    assert "hf:gs://b/bert is a URL, but HF folders (hf:DIR) are read from a local disk" in capsys.readouterr().err
    # --format hf is refused before the source is even looked at.
    assert cli.main(["export", "runs/none", "gs://b/bert_hf/", "--format", "hf"]) == 2
    err = capsys.readouterr().err
    assert "OUT=gs://b/bert_hf/ is a URL, but --format hf writes an HF folder to a local disk" in err
    assert len(err.strip().splitlines()) == 1
    assert os.listdir(tmp_path) == []  # no folder named "gs:" or "s3:"


def test_pretrained_source_refuses_a_url_weights_file():
    from jaxckpt.runner.sources import load_pretrained

    with pytest.raises(UserError, match=r"^checkpoint.pretrained=gs://b/w.safetensors is a URL, but weights"):
        load_pretrained("gs://b/w.safetensors", {"w": np.zeros(2)}, None)


def test_write_safetensors_to_a_url_reads_back(store_url):
    from safetensors.numpy import load

    params = {"head": {"kernel": np.arange(6, dtype=np.float32).reshape(2, 3), "bias": np.ones(3, np.float32)}}
    names = foreign.write_safetensors(params, f"{store_url}/export/model.safetensors")
    assert names == {"head/kernel": "head.weight", "head/bias": "head.bias"}
    tensors = load(storage.as_path(f"{store_url}/export/model.safetensors").read_bytes())
    np.testing.assert_array_equal(tensors["head.weight"], params["head"]["kernel"].T)
    assert [p.name for p in storage.as_path(f"{store_url}/export").iterdir()] == ["model.safetensors"]


def test_hf_config_may_be_a_url(store_url):
    from jaxckpt.cli.hf_cli import hf_config_of

    storage.write_bytes_atomic(f"{store_url}/config.json", json.dumps({"model_type": "bert"}).encode())
    assert hf_config_of("unused", f"{store_url}/config.json") == {"model_type": "bert"}


def test_follow_a_url_workdir_defers_its_metric_points_to_the_end(store_url):
    workdir = f"{store_url}/followed"
    config = {"task": "unused", "train": {"num_steps": 20}, "early_stop": {"criteria": ""}}
    for step in (10, 20):  # what the follower reads of a step: its saved config and loop state
        _fake_step(f"{workdir}/checkpoints", step, committed=True)
        storage.write_bytes_atomic(f"{workdir}/checkpoints/{step}/extra/metadata",
                                   json.dumps({"config": config, "loop_state": {}}).encode())
    _fake_step(f"{workdir}/checkpoints", 30, committed=False)  # a save in progress: not a step yet
    seen = []

    def evaluate(step_dir):
        seen.append(str(step_dir))
        # Nothing is appended while the trainer may still be rewriting metrics.jsonl.
        assert not storage.as_path(f"{workdir}/metrics.jsonl").exists()
        return {"loss": float(step_dir.name) / 100}

    result = follower.follow(workdir, evaluate=evaluate, poll_seconds=0.01)
    assert result["evaluated"] == [10, 20] and result["skipped"] == []
    assert seen == [f"{workdir}/checkpoints/10", f"{workdir}/checkpoints/20"]
    assert json.loads(storage.as_path(f"{workdir}/eval_val_20.json").read_text()) == \
        {"step": 20, "split": "val", "loss": 0.2}
    lines = storage.as_path(f"{workdir}/metrics.jsonl").read_text().splitlines()
    assert [json.loads(line) for line in lines] == [{"step": 10, "split": "val", "loss": 0.1},
                                                    {"step": 20, "split": "val", "loss": 0.2}]
    # Restarted, it finds both results and writes no point twice.
    assert follower.follow(workdir, evaluate=evaluate, poll_seconds=0.01)["evaluated"] == []
    assert len(storage.as_path(f"{workdir}/metrics.jsonl").read_text().splitlines()) == 2


# With the checkpoint layer on URLs: a small run saved by CheckpointManager straight to the store.

def _save_run(run: str, task_name: str) -> dict:
    config = {"task": task_name, "seed": 0, "model": {"width": 3}, "data": {"target": "parity"},
              "early_stop": {"criteria": "val/loss", "minimize": True}}
    storage.write_bytes_atomic(f"{run}/config.json", json.dumps(config).encode())
    manager = CheckpointManager(f"{run}/checkpoints", max_to_keep=-1, best_metric="val/loss", async_save=False)
    for step, loss in ((10, 0.2), (20, 0.5)):
        params = {"encoder": {"kernel": np.full((4, 3), step, np.float32)},
                  "head": {"kernel": np.ones((3, 2), np.float32)}}
        manager.save(step, {"step": np.int32(step), "params": params, "opt_state": {"mu": params}},
                     metrics={"val/loss": loss}, extra={"config": config})
    manager.close()
    return config


def _run_with_task(run: str, tmp_path, monkeypatch):
    """Saves a run with steps 10 and 20 (best 10 by val/loss) at `run`; its task and config file are local."""
    task_name = f"cli_remote_task_{os.getpid()}_{abs(hash(str(tmp_path))) % 10**8}"
    (tmp_path / f"{task_name}.py").write_text(_TASK)
    monkeypatch.syspath_prepend(str(tmp_path))
    config_path = tmp_path / "config_file.py"
    config_path.write_text(_CONFIG.format(task=task_name))
    monkeypatch.setenv("JAXCKPT_ZOO", str(tmp_path / "zoo"))
    _save_run(run, task_name)
    return run, config_path


@pytest.fixture
def url_run(store_url, tmp_path, monkeypatch):
    return _run_with_task(f"{store_url}/run", tmp_path, monkeypatch)


@pytest.fixture
def gcs_run(gcs_emulator, request, tmp_path, monkeypatch):
    return _run_with_task(f"{gcs_emulator}/cli/{request.node.originalname}/run", tmp_path, monkeypatch)


def test_inspect_and_verify_a_url_run(url_run, capsys):
    run, _ = url_run
    assert cli.main(["inspect", run]) == 0
    out = capsys.readouterr().out
    assert f"checkpoints: {run}/checkpoints" in out
    assert "steps:       10, 20" in out and "best:        10 by val/loss (min)" in out
    assert "params/encoder/kernel  (4, 3)  float32" in out
    assert "integrity of step 20: ok" in out
    assert cli.main(["inspect", f"{run}/checkpoints/10", "--no-verify"]) == 0
    assert "state of step 10" in capsys.readouterr().out
    assert cli.main(["verify", run]) == 0
    out = capsys.readouterr().out
    assert "step 10: ok" in out and "step 20: ok" in out


def test_plan_pretrained_export_and_publish_from_gcs(gcs_run, capsys):
    run, config_path = gcs_run
    assert cli.main(["plan", f"{run}/checkpoints/10", "--config", str(config_path)]) == 0
    out = capsys.readouterr().out
    assert f"step directory {run}/checkpoints/10" in out and "would succeed" in out

    fresh = {"encoder": {"kernel": np.zeros((4, 3), np.float32)}, "head": {"kernel": np.zeros((3, 2), np.float32)}}
    params, report = load_params(run, fresh, step="best", best_metric="val/loss")
    np.testing.assert_array_equal(np.asarray(params["encoder"]["kernel"]), np.full((4, 3), 10))
    assert report.ok

    from jaxckpt.runner.sources import load_pretrained

    ck = ml_collections.ConfigDict({"strict": False, "mapping": "encoder:encoder", "skip": "", "adapters": "",
                                    "rename": "", "structure": ""})
    params, report = load_pretrained(f"{run}/checkpoints/20", fresh, ck)
    np.testing.assert_array_equal(np.asarray(params["encoder"]["kernel"]), np.full((4, 3), 20))
    np.testing.assert_array_equal(np.asarray(params["head"]["kernel"]), np.zeros((3, 2)))  # not mapped: fresh

    # checkpoint.resume_file: resolved as decide_start does, then opened by the manager.
    from jaxckpt.runner.sources import resolve_ref

    checkpoint_dir, step = resolve_checkpoint_path(resolve_ref(f"{run}/checkpoints/20"), key="checkpoint.resume_file")
    source = CheckpointManager(checkpoint_dir, read_only=True)
    try:
        assert step == 20 and source.all_steps() == [10, 20]
        source.verify(step)
        assert source.restore_extra(step)["config"]["model"] == {"width": 3}
    finally:
        source.close()

    assert cli.main(["export", run, f"{run}/export/model.safetensors", "--best"]) == 0
    assert "params of step 10" in capsys.readouterr().out
    from safetensors.numpy import load

    exported = load(storage.as_path(f"{run}/export/model.safetensors").read_bytes())
    np.testing.assert_array_equal(exported["encoder.weight"], np.full((3, 4), 10))

    assert cli.main(["zoo", "publish", run, "from-gcs", "--best"]) == 0
    assert "published zoo:from-gcs (step 10" in capsys.readouterr().out
    entry = zoo.list_entries()[0]
    assert entry["source"] == run and entry["metrics"]["val/loss"] == pytest.approx(0.2)
    assert cli.main(["verify", "zoo:from-gcs"]) == 0  # a whole local copy, commit marker and all
    assert "step 10: ok" in capsys.readouterr().out

