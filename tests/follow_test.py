"""The follower evaluator: `python -m jaxckpt follow WORKDIR` beside `experiments/run.py`."""

import collections
import json
import os
import signal
import subprocess
import sys
import threading
import time

import jax.numpy as jnp
import pytest

import jaxckpt
from jaxckpt.checkpoint import pins
from jaxckpt.cli.commands import main as cli
from jaxckpt.runner.follow import FollowerResults, apply_overrides, follow
from jaxckpt.errors import UserError
from tests.runs import ROOT, read_jsonl, tiny_flags

ENV = {**os.environ, "XLA_FLAGS": "", "PYTHONPATH": str(ROOT)}


def _start(args, **env):
    return subprocess.Popen(args, cwd=ROOT, env={**ENV, **env}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)


def _train(data_dir, workdir, **overrides):
    return _start([sys.executable, "experiments/run.py", *tiny_flags(data_dir, **overrides), "--workdir", str(workdir)],
                  SLOW_TRAIN_SECONDS=os.environ.get("SLOW_TRAIN_SECONDS", "0"))


def _follower(workdir, **env):
    return _start([sys.executable, "-m", "jaxckpt", "follow", str(workdir), "--poll", "0.1"], **env)


def _finish(process, timeout=300):
    out, _ = process.communicate(timeout=timeout)
    assert process.returncode == 0, out
    return out


def _steps(workdir):
    return sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())


def _val_points(workdir):
    return [p for p in read_jsonl(workdir / "metrics.jsonl") if p["split"] == "val"]


def test_pins_keep_a_step_and_a_doomed_step_cannot_be_pinned(tmp_path):
    with jaxckpt.CheckpointManager(tmp_path, max_to_keep=1, async_save=False) as manager:
        manager.save(1, {"w": jnp.ones(2)})
        pinned = pins.pin(tmp_path, 1)
        manager.save(2, {"w": jnp.ones(2)})
        assert manager.all_steps() == [1, 2]  # pinned: kept beyond max_to_keep
        pins.unpin(pinned)
        manager.save(3, {"w": jnp.ones(2)})
        assert manager.all_steps() == [3]
        assert pins.pin(tmp_path, 2) is None  # deleted
        manager.save(4, {"w": jnp.ones(2)})
        assert pins.pin(tmp_path, 3) is None  # doomed by the decision of save 4, whenever Orbax deletes it


def test_a_dead_readers_pin_is_ignored(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    with jaxckpt.CheckpointManager(tmp_path, max_to_keep=1, async_save=False) as manager:
        manager.save(1, {"w": jnp.ones(2)})
        pin = pins.pin(tmp_path, 1)
        pin.rename(pin.with_name(pin.name.rsplit("-", 1)[0] + f"-{dead.stdout.strip()}"))
        manager.save(2, {"w": jnp.ones(2)})
        assert manager.all_steps() == [2]


def test_overrides_apply_to_the_saved_config_and_misspelt_keys_are_named():
    config = apply_overrides({"eval": {"batch_size": 8, "use_ema": False}}, ["--config.eval.batch_size=16"])
    assert config.eval.batch_size == 16
    with pytest.raises(UserError, match="--config.eval.bach_size"):
        apply_overrides({"eval": {"batch_size": 8}}, ["--config.eval.bach_size=16"])


def test_slow_follower_beside_max_to_keep_1_never_loses_the_step_it_evaluates(tmp_path, data_dir):
    """Retention deletes steps the follower has not reached (skipped), never the one it is evaluating."""
    workdir = tmp_path / "run"
    seen = collections.defaultdict(list)

    def slow_evaluate(step_dir):
        seen[int(step_dir.name)].append(step_dir.is_dir())
        time.sleep(2.5)  # meanwhile the trainer saves (and retention runs) several times
        seen[int(step_dir.name)].append((step_dir / "state").is_dir())
        return {"loss": float(step_dir.name)}

    result = {}
    thread = threading.Thread(target=lambda: result.update(follow(workdir, poll_seconds=0.05, evaluate=slow_evaluate)))
    thread.start()
    os.environ["SLOW_TRAIN_SECONDS"] = "0.05"
    try:
        trainer = _train(data_dir, workdir, **{"task": "tests.slow_task", "run_type": "train", "train.num_steps": 80,
                                               "checkpoint.every_steps": 10, "checkpoint.max_to_keep": 1,
                                               "checkpoint.keep_best": 0})
    finally:
        del os.environ["SLOW_TRAIN_SECONDS"]
    _finish(trainer)
    thread.join(timeout=300)
    assert not thread.is_alive()
    evaluated, skipped = result["evaluated"], sorted(result["skipped"])
    assert all(seen[step] == [True, True] for step in evaluated), seen  # present before and after
    # Deleted before their turn: skipped (and logged), not an error; every saved step is one or the other.
    assert skipped and not set(skipped) & set(evaluated)
    assert sorted(skipped + evaluated) == list(range(10, 90, 10))
    assert 80 in evaluated and set(_steps(workdir)) <= set(evaluated)  # every surviving step evaluated
    points = [p["step"] for p in _val_points(workdir)]
    assert points == evaluated and len(set(points)) == len(points)  # once each
    assert sorted(int(p.stem.rsplit("_", 1)[1]) for p in workdir.glob("eval_val_*.json")) == sorted(evaluated)
    assert not [p for p in (workdir / "checkpoints" / ".pins").iterdir() if ".pin-" in p.name or "follower-" in p.name]


def test_follower_killed_and_restarted_evaluates_each_step_once(tmp_path, data_dir):
    workdir = tmp_path / "run"
    _finish(_train(data_dir, workdir, **{"run_type": "train", "checkpoint.every_steps": 10,
                                         "checkpoint.max_to_keep": -1, "task": "tests.slow_task"}))
    first = _follower(workdir, SLOW_EVAL_SECONDS="1")
    deadline = time.monotonic() + 120
    while not (workdir / "eval_val_20.json").exists():
        assert time.monotonic() < deadline and first.poll() is None
        time.sleep(0.05)
    first.send_signal(signal.SIGKILL)
    first.wait()
    assert not (workdir / "eval_val_40.json").exists()
    # As if it had been killed between the JSON and its metrics.jsonl line: the restart writes the line.
    lines = (workdir / "metrics.jsonl").read_text().splitlines(keepends=True)
    (workdir / "metrics.jsonl").write_text("".join(l for l in lines if '"step": 20, "split": "val"' not in l))
    out = _finish(_follower(workdir))
    assert "already evaluated (last 20)" in out
    assert [p["step"] for p in _val_points(workdir)] == [10, 20, 30, 40]
    log = (workdir / "follow.log").read_text()
    for step in (10, 20, 30, 40):
        assert log.count(f"follow: step {step} val") == 1, log
    assert not [p for p in (workdir / "checkpoints" / ".pins").iterdir() if ".pin-" in p.name]


def test_best_k_by_follower_metrics_keeps_what_train_val_keeps(tmp_path, data_dir, capsys):
    # Maximising the loss makes the best step the first one, so keeping it needs its metric before
    # max_to_keep=1 would delete it: the follower's results must rank it, as the in-loop ones do.
    config = {"checkpoint.every_steps": 10, "train.eval_every_steps": 10, "checkpoint.max_to_keep": 1,
              "checkpoint.keep_best": 1, "early_stop.minimize": False}
    in_loop, followed = tmp_path / "train_val", tmp_path / "train"
    reference = _train(data_dir, in_loop, **config)
    follower = _follower(followed)  # attached before the first save
    _finish(reference)
    _finish(_train(data_dir, followed, **config, run_type="train"))
    _finish(follower)
    assert _steps(followed) == _steps(in_loop) == [10, 40]
    assert _val_points(followed) == _val_points(in_loop)  # same points, same values
    late = FollowerResults(followed, "val")
    manager = jaxckpt.CheckpointManager(followed / "checkpoints", read_only=True, best_metric="val/loss",
                                        best_mode="max", late_metrics=late)
    assert manager.best_step() == 10
    assert json.loads((followed / "eval_val_10.json").read_text())["loss"] == _val_points(in_loop)[0]["loss"]
    assert cli(["inspect", str(followed)]) == 0
    assert "best:        10 by val/loss (max)" in capsys.readouterr().out
