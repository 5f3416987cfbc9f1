"""End-to-end runs of the config-driven loop (in process, 4 faked CPU devices)."""

import json
import math
import re

import jax
import numpy as np
import pytest

import jaxckpt
from jaxckpt.checkpoint.manager import CheckpointManager
from jaxckpt.errors import UserError, WorkdirError
from jaxckpt.runner.publish import publish
from tests.runs import read_jsonl, tiny_config


@pytest.fixture(scope="module")
def pretrained_run(tmp_path_factory, data_dir):
    """One finished 40-step train_val run that other tests read from (never write to)."""
    workdir = tmp_path_factory.mktemp("pretrained")
    jaxckpt.run(tiny_config(data_dir), workdir)
    return workdir


def _params(workdir, step=None):
    """Params of a step (default: latest), read with plain Orbax as a user without jaxckpt would."""
    return _plain_orbax_state(workdir, step)["params"]


def _plain_orbax_state(workdir, step=None):
    import orbax.checkpoint as ocp

    checkpoints = workdir / "checkpoints"
    step = step or max(int(p.name) for p in checkpoints.iterdir() if p.name.isdigit())
    path = checkpoints / str(step) / "state"
    ckptr = ocp.PyTreeCheckpointer()
    tree = ckptr.metadata(path).item_metadata.tree
    as_numpy = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
    return ckptr.restore(path, args=ocp.args.PyTreeRestore(restore_args=as_numpy))


def test_train_val_writes_the_run_directory(pretrained_run):
    files = {p.name for p in pretrained_run.iterdir()}
    assert {"config.json", "checkpoints", "metrics.jsonl", "curves.png", "tensorboard", "train.log"} <= files
    points = read_jsonl(pretrained_run / "metrics.jsonl")
    assert [(p["step"], p["split"]) for p in points] == [
        (10, "train"), (20, "train"), (20, "val"), (30, "train"), (40, "train"), (40, "val")]
    assert all(math.isfinite(p["loss"]) for p in points)
    assert points[-1]["num_examples"] == 216 and type(points[-1]["num_examples"]) is int  # as in eval_*.json
    assert json.loads((pretrained_run / "config.json").read_text())["train"]["num_steps"] == 40
    assert (pretrained_run / "curves.png").read_bytes()[:4] == b"\x89PNG"
    assert "fresh start from random initialisation" in (pretrained_run / "train.log").read_text()


def test_on_a_terminal_log_lines_do_not_run_into_the_progress_bar(tmp_path, data_dir, monkeypatch, capsys):
    from jaxckpt.runner import loop
    from jaxckpt.runner.logs import setup_logging

    monkeypatch.setattr(loop, "_is_terminal", lambda: True)
    setup_logging()  # the library logs to the `jaxckpt` logger; the command line sends it to stderr
    jaxckpt.run(tiny_config(data_dir, **{"train.num_steps": 20, "train.eval_every_steps": 10}), tmp_path / "run")
    err = capsys.readouterr().err
    assert "10/20" in err  # the bar was drawn
    lines = [line for line in err.split("\n") if " INFO step 10 val " in line]
    # What a terminal shows of the line is what follows its last carriage return: the log line whole.
    assert len(lines) == 1 and re.match(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d INFO step 10 val ", lines[0].split("\r")[-1]), lines


def test_rerun_resumes_from_latest_without_duplicated_points(tmp_path, data_dir, pretrained_run):
    workdir = tmp_path / "run"
    jaxckpt.run(tiny_config(data_dir, **{"train.num_steps": 20}), workdir)
    state = jaxckpt.run(tiny_config(data_dir), workdir)  # same run, now to 40 steps
    assert int(state.step) == 40
    log = (workdir / "train.log").read_text()
    assert "resuming from this workdir's latest checkpoint, step 20" in log
    # config.json now says 40: the log keeps what the checkpoint was trained with.
    assert "config changes since step 20: train.num_steps 20 -> 40\n" in log
    steps = [(p["step"], p["split"]) for p in read_jsonl(workdir / "metrics.jsonl")]
    assert len(steps) == len(set(steps)) == 6
    # Resuming continued the same run: identical to the uninterrupted one.
    for a, b in zip(jax.tree.leaves(_params(workdir)), jax.tree.leaves(_params(pretrained_run))):
        np.testing.assert_array_equal(a, b)
    assert read_jsonl(workdir / "metrics.jsonl") == read_jsonl(pretrained_run / "metrics.jsonl")


@pytest.mark.parametrize("stop_at", [7, 20, 33])
def test_preempted_run_resumes_bitwise(tmp_path, data_dir, pretrained_run, monkeypatch, stop_at):
    """A signal at any step (mid-window, at a save, between evals): saving, rerun, same final state."""
    from jaxckpt.runner import preemption

    workdir = tmp_path / "run"
    calls = {"n": 0}
    original = preemption.StopRequest.requested

    def requested(self):
        calls["n"] += 1
        if self.signum is None and calls["n"] == stop_at:
            self.signum = 15
        return original.fget(self)

    monkeypatch.setattr(preemption.StopRequest, "requested", property(requested))
    with pytest.raises(jaxckpt.Preempted) as excinfo:
        jaxckpt.run(tiny_config(data_dir), workdir)
    assert excinfo.value.step == stop_at
    monkeypatch.undo()
    with CheckpointManager(workdir / "checkpoints", read_only=True) as manager:
        assert manager.latest_step() == stop_at
    jaxckpt.run(tiny_config(data_dir), workdir)
    for a, b in zip(jax.tree.leaves(_params(workdir)), jax.tree.leaves(_params(pretrained_run))):
        np.testing.assert_array_equal(a, b)
    assert read_jsonl(workdir / "metrics.jsonl") == read_jsonl(pretrained_run / "metrics.jsonl")


def test_eir_partial_loading_after_changing_fusion(tmp_path, data_dir, pretrained_run):
    changed = dict(**{"checkpoint.pretrained": str(pretrained_run), "model.fusion_dims": (8,)})
    with pytest.raises(UserError, match="fusion/Dense_0/kernel") as excinfo:
        jaxckpt.run(tiny_config(data_dir, **changed), tmp_path / "strict")
    assert "checkpoint.strict=False" in str(excinfo.value)
    workdir = tmp_path / "partial"
    jaxckpt.run(tiny_config(data_dir, **changed, **{"checkpoint.strict": False, "train.num_steps": 20}), workdir)
    report = json.loads((workdir / "graft_report.json").read_text())
    assert {e["path"] for e in report["loaded"]} == {"encoder/Dense_0/kernel", "encoder/Dense_0/bias", "head/bias"}
    assert {e["path"] for e in report["mismatched"]} == {
        "fusion/Dense_0/kernel", "fusion/Dense_0/bias", "head/kernel"}


def test_mmf_zoo_finetune_onto_parity_with_mapping(tmp_path, data_dir, pretrained_run, monkeypatch):
    monkeypatch.setenv("JAXCKPT_ZOO", str(tmp_path / "zoo"))
    publish(pretrained_run, "digits-mlp", step="best")
    workdir = tmp_path / "parity"
    config = tiny_config(data_dir, **{"checkpoint.pretrained": "zoo:digits-mlp", "checkpoint.mapping": "encoder:encoder",
                                      "data.target": "parity", "train.num_steps": 20})
    state = jaxckpt.run(config, workdir)
    report = json.loads((workdir / "graft_report.json").read_text())
    assert report["counts"]["loaded"] == 2 and report["counts"]["untouched"] == 4
    assert state.params["head"]["kernel"].shape == (16, 2)
    # The loaded encoder started from the zoo weights: step-0 encoder equals the pretrained one.
    assert "checkpoint.pretrained=zoo:digits-mlp" in (workdir / "train.log").read_text()


def test_own_checkpoint_wins_over_pretrained_and_resume_file(tmp_path, data_dir, pretrained_run):
    workdir = tmp_path / "run"
    jaxckpt.run(tiny_config(data_dir, **{"train.num_steps": 20}), workdir)
    config = tiny_config(data_dir, **{"checkpoint.pretrained": str(pretrained_run),
                                      "checkpoint.resume_file": str(pretrained_run)})
    jaxckpt.run(config, workdir)
    log = (workdir / "train.log").read_text()
    assert "resuming from this workdir's latest checkpoint, step 20 (checkpoint.resume_file/pretrained are ignored" in log
    assert not (workdir / "graft_report.json").exists()


def test_resume_file_continues_the_full_state(tmp_path, data_dir, pretrained_run):
    config = tiny_config(data_dir, **{"checkpoint.resume_file": str(pretrained_run / "checkpoints" / "20"),
                                      "checkpoint.pretrained": str(pretrained_run)})
    state = jaxckpt.run(config, tmp_path / "run")
    assert int(state.step) == 40
    log = (tmp_path / "run" / "train.log").read_text()
    assert f"checkpoint.pretrained={pretrained_run} is ignored: resume_file wins" in log
    assert not (tmp_path / "run" / "graft_report.json").exists()
    for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(_params(pretrained_run, 40))):
        np.testing.assert_array_equal(a, b)


def test_val_and_test_runs_match_the_logged_metrics(tmp_path, data_dir, pretrained_run):
    workdir = tmp_path / "eval"
    result = jaxckpt.run(tiny_config(data_dir, **{"run_type": "val", "checkpoint.resume_file": str(pretrained_run)}),
                         workdir)
    logged = [p for p in read_jsonl(pretrained_run / "metrics.jsonl") if p["split"] == "val" and p["step"] == 40][0]
    saved = json.loads((workdir / "eval_val_40.json").read_text())
    assert saved == result
    assert saved["num_examples"] == 216
    assert saved["loss"] == pytest.approx(logged["loss"], rel=1e-6)
    assert saved["accuracy"] == pytest.approx(logged["accuracy"], rel=1e-6)
    test = jaxckpt.run(tiny_config(data_dir, **{"run_type": "test", "checkpoint.resume_file": str(pretrained_run)}),
                       workdir)
    assert test["split"] == "test" and test["num_examples"] == 359


def test_val_with_another_optimizer_reads_only_the_params(tmp_path, data_dir, pretrained_run, capfd):
    # The run trained with adam; evaluating needs no optimizer state, so any optimizer config works.
    config = tiny_config(data_dir, **{"run_type": "val", "checkpoint.resume_file": str(pretrained_run),
                                      "optimizer.name": "sgd", "optimizer.freeze": "encoder"})
    result = jaxckpt.run(config, tmp_path / "eval")
    # Orbax's notes that the resume_file's directory, opened read-only on purpose, is read-only.
    assert "read only" not in capfd.readouterr().err.replace("read-only", "")
    logged = [p for p in read_jsonl(pretrained_run / "metrics.jsonl") if p["split"] == "val" and p["step"] == 40][0]
    assert result["step"] == 40 and result["accuracy"] == pytest.approx(logged["accuracy"], rel=1e-6)
    assert "loading the params of step 40 from checkpoint.resume_file" in (tmp_path / "eval" / "train.log").read_text()


def test_resume_file_of_another_model_names_the_config_fields_that_differ(tmp_path, data_dir, pretrained_run):
    config = tiny_config(data_dir, **{"run_type": "test", "checkpoint.resume_file": str(pretrained_run),
                                      "data.target": "parity"})
    with pytest.raises(UserError) as excinfo:
        jaxckpt.run(config, tmp_path / "eval")
    message = str(excinfo.value)
    assert "params/head/kernel: checkpoint (16, 10) vs config (16, 2)" in message
    assert "data.target: checkpoint 'digit' vs config 'parity'" in message
    assert "train.num_steps" not in message and "jaxckpt.weights.pretrained.load_params" not in message
    config = tiny_config(data_dir, **{"checkpoint.resume_file": str(pretrained_run), "model.fusion_dims": (8,)})
    with pytest.raises(UserError) as excinfo:
        jaxckpt.run(config, tmp_path / "train")
    message = str(excinfo.value)
    assert "model.fusion_dims: checkpoint [16] vs config [8]" in message
    assert f"pass --config.checkpoint.pretrained={pretrained_run}." in message
    assert not list((tmp_path / "train").glob("checkpoints/*"))


def test_predict_writes_one_row_per_test_example(tmp_path, data_dir, pretrained_run):
    path = jaxckpt.run(tiny_config(data_dir, **{"run_type": "predict", "checkpoint.resume_file": str(pretrained_run)}),
                       tmp_path / "pred")
    lines = path.read_text().splitlines()
    assert lines[0] == "id,prediction," + ",".join(f"prob_{c}" for c in range(10))
    rows = [line.split(",") for line in lines[1:]]
    assert len(rows) == 359 and len({r[0] for r in rows}) == 359
    probs = np.asarray([[float(x) for x in r[2:]] for r in rows])
    np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-4)
    assert all(r[1] == str(int(np.argmax(p))) for r, p in zip(rows, probs))


def test_val_without_a_model_is_a_clear_error(tmp_path, data_dir):
    with pytest.raises(UserError, match="nothing to val"):
        jaxckpt.run(tiny_config(data_dir, run_type="val"), tmp_path / "empty")


def test_resume_best_sets_newer_checkpoints_aside(tmp_path, data_dir):
    workdir = tmp_path / "run"
    config = tiny_config(data_dir, **{"checkpoint.max_to_keep": -1, "early_stop.criteria": "val/accuracy",
                                      "early_stop.minimize": False})
    jaxckpt.run(config, workdir)
    with CheckpointManager(workdir / "checkpoints", read_only=True, best_metric="val/accuracy",
                           best_mode="max") as manager:
        best = manager.best_step()
    config = tiny_config(data_dir, **{"checkpoint.max_to_keep": -1, "checkpoint.resume_best": True,
                                      "early_stop.criteria": "val/accuracy", "early_stop.minimize": False,
                                      "train.num_steps": 60})
    jaxckpt.run(config, workdir)
    assert f"resuming from this workdir's best checkpoint, step {best}" in (workdir / "train.log").read_text()
    if best < 40:
        moved = list((workdir / "superseded").glob("*/40"))
        assert moved, "the newer step 40 must be set aside, not deleted"


def test_continuing_from_best_keeps_the_newer_metric_points_aside(tmp_path, data_dir):
    # Ranking by the highest val/loss makes the first evaluation (step 20) the best.
    settings = {"checkpoint.max_to_keep": -1, "early_stop.criteria": "val/loss", "early_stop.minimize": False}
    workdir = tmp_path / "run"
    jaxckpt.run(tiny_config(data_dir, **settings), workdir)
    before = read_jsonl(workdir / "metrics.jsonl")
    jaxckpt.run(tiny_config(data_dir, **settings, **{"checkpoint.resume_best": True, "train.num_steps": 30}), workdir)
    (aside,) = (workdir / "superseded").iterdir()
    assert sorted(p.name for p in aside.iterdir()) == ["40", "metrics.jsonl"]
    assert read_jsonl(aside / "metrics.jsonl") == [p for p in before if p["step"] > 20]
    assert [(p["step"], p["split"]) for p in read_jsonl(workdir / "metrics.jsonl")] == [
        (10, "train"), (20, "train"), (20, "val"), (30, "train"), (30, "val")]
    assert "newer steps [40] and their 3 metric points moved to" in (workdir / "train.log").read_text()


def test_max_to_keep_all_and_one(tmp_path, data_dir):
    jaxckpt.run(tiny_config(data_dir, **{"checkpoint.max_to_keep": -1, "checkpoint.every_steps": 10}), tmp_path / "all")
    assert sorted(int(p.name) for p in (tmp_path / "all" / "checkpoints").iterdir() if p.name.isdigit()) == [10, 20, 30, 40]
    jaxckpt.run(tiny_config(data_dir, **{"checkpoint.max_to_keep": 1, "checkpoint.keep_best": 0,
                                         "checkpoint.every_steps": 10}), tmp_path / "one")
    assert sorted(int(p.name) for p in (tmp_path / "one" / "checkpoints").iterdir() if p.name.isdigit()) == [40]


def test_early_stop_with_patience(tmp_path, data_dir):
    config = tiny_config(data_dir, **{"train.num_steps": 200, "train.eval_every_steps": 10,
                                      "optimizer.learning_rate": 0.0, "early_stop.patience": 1})
    state = jaxckpt.run(config, tmp_path / "run")
    # lr=0: the first eval is the best and never improves; stop after patience+1 more evaluations.
    assert int(state.step) == 30
    assert "early stop at step 30" in (tmp_path / "run" / "train.log").read_text()
    # Every evaluation ties: the manager's best is early stopping's, the first step with that value.
    with CheckpointManager(tmp_path / "run" / "checkpoints", read_only=True, best_metric="val/loss") as manager:
        assert manager.all_steps() == [10, 20, 30] and manager.best_step() == 10
    # Rerunning the command trains nothing and writes no checkpoint: the run is over.
    points = (tmp_path / "run" / "metrics.jsonl").read_text()
    state = jaxckpt.run(config, tmp_path / "run")
    assert int(state.step) == 30
    assert "the run already stopped early at step 30" in (tmp_path / "run" / "train.log").read_text()
    with CheckpointManager(tmp_path / "run" / "checkpoints", read_only=True) as manager:
        assert manager.all_steps() == [10, 20, 30]
    assert (tmp_path / "run" / "metrics.jsonl").read_text() == points
    # Turning early stopping off trains on from where it stopped.
    state = jaxckpt.run(tiny_config(data_dir, **{"train.num_steps": 40, "train.eval_every_steps": 10,
                                                 "optimizer.learning_rate": 0.0}), tmp_path / "run")
    assert int(state.step) == 40


@pytest.mark.parametrize("criteria", ["val/acc", "val/num_examples", "train/loss"])
def test_unknown_early_stop_criteria_fails_before_training(tmp_path, data_dir, criteria):
    with pytest.raises(UserError) as excinfo:
        jaxckpt.run(tiny_config(data_dir, **{"early_stop.criteria": criteria}), tmp_path / "run")
    message = str(excinfo.value)
    assert f"early_stop.criteria={criteria!r}" in message and "use one of val/accuracy, val/loss," in message
    assert "num_examples" not in message.replace(criteria, "")  # a count, not a metric to stop on
    assert not (tmp_path / "run" / "metrics.jsonl").exists()  # not one step was trained
    assert not list((tmp_path / "run").glob("checkpoints/*"))


def test_a_config_error_leaves_nothing_in_a_new_workdir(tmp_path, data_dir):
    with pytest.raises(ValueError, match="config.data.target='foo'"):
        jaxckpt.run(tiny_config(data_dir, **{"data.target": "foo"}), tmp_path / "new")
    assert not (tmp_path / "new").exists()
    (tmp_path / "empty").mkdir()  # made by the user: kept, and left as it was
    with pytest.raises(UserError, match="early_stop.criteria"):
        jaxckpt.run(tiny_config(data_dir, **{"early_stop.criteria": "val/acc"}), tmp_path / "empty")
    assert list((tmp_path / "empty").iterdir()) == []
    # A workdir with a run in it keeps everything, its log included.
    workdir = tmp_path / "run"
    jaxckpt.run(tiny_config(data_dir, **{"train.num_steps": 10, "checkpoint.every_steps": 10}), workdir)
    before = sorted(p.name for p in workdir.iterdir())
    with pytest.raises(UserError, match="early_stop.criteria"):
        jaxckpt.run(tiny_config(data_dir, **{"train.num_steps": 20, "early_stop.criteria": "val/acc"}), workdir)
    assert sorted(p.name for p in workdir.iterdir()) == before


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, data_dir):
    config = tiny_config(data_dir, **{"optimizer.name": "sgd", "optimizer.learning_rate": 1e30,
                                      "checkpoint.every_steps": 1, "train.log_every_steps": 1})
    with pytest.raises(jaxckpt.NonFiniteLossError, match="last good checkpoint"):
        jaxckpt.run(config, tmp_path / "run")
    with CheckpointManager(tmp_path / "run" / "checkpoints", read_only=True) as manager:
        steps = manager.all_steps()
    assert steps, "the good steps before the blow-up were saved"
    for step in steps:
        assert all(np.isfinite(x).all() for x in jax.tree.leaves(_params(tmp_path / "run", step)))


def test_workdir_of_another_experiment_is_refused(tmp_path, data_dir):
    workdir = tmp_path / "run"
    jaxckpt.run(tiny_config(data_dir, **{"train.num_steps": 20}), workdir)
    with pytest.raises(WorkdirError, match="holds a different experiment") as excinfo:
        jaxckpt.run(tiny_config(data_dir, **{"model.fusion_dims": (8,)}), workdir)
    assert "model.fusion_dims: checkpoint [16] vs config [8]" in str(excinfo.value)


def test_resume_false_refuses_to_mix_runs(tmp_path, data_dir):
    workdir = tmp_path / "run"
    jaxckpt.run(tiny_config(data_dir, **{"train.num_steps": 20}), workdir)
    with pytest.raises(WorkdirError, match="resume=False"):
        jaxckpt.run(tiny_config(data_dir, **{"checkpoint.resume": False}), workdir)
