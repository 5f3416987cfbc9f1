"""Tests for jaxckpt.weights.zoo (list / resolve) and jaxckpt.runner.publish: named, self-contained checkpoints."""

import json
import os
import pathlib
import shutil
import stat

import jax
import numpy as np
import pytest

from jaxckpt.checkpoint.manager import CheckpointManager
from jaxckpt.errors import CheckpointNotFoundError
from jaxckpt.runner.publish import publish
from jaxckpt.runner.writers import JsonlWriter
from jaxckpt.weights import zoo


def _state(step):
    return {"step": np.int32(step), "params": {"dense": {"kernel": np.full((2, 3), step, np.float32),
                                                         "bias": np.zeros(3, np.float32)}}}


def _make_run(workdir, val_losses):
    """A run directory with one checkpoint per step, steps 10, 20, ... ranked by `val/loss`."""
    config = {"task": "tests.tiny", "early_stop": {"criteria": "val/loss", "minimize": True}}
    workdir.mkdir(parents=True)
    (workdir / "config.json").write_text(json.dumps(config))
    manager = CheckpointManager(workdir / "checkpoints", max_to_keep=-1, best_metric="val/loss",
                                async_save=False)
    with JsonlWriter(workdir / "metrics.jsonl") as writer:
        for i, loss in enumerate(val_losses):
            step = 10 * (i + 1)
            manager.save(step, _state(step), metrics={"val/loss": loss}, extra={"config": config})
            writer.write(step, "train", {"loss": loss + 1})
    manager.close()
    return workdir


@pytest.fixture
def zoo_root(tmp_path, monkeypatch):
    root = tmp_path / "zoo"
    monkeypatch.setenv("JAXCKPT_ZOO", str(root))
    return root


def test_zoo_dir_follows_env_and_xdg(tmp_path, monkeypatch):
    monkeypatch.setenv("JAXCKPT_ZOO", str(tmp_path / "z"))
    assert zoo.zoo_dir() == tmp_path / "z"
    monkeypatch.delenv("JAXCKPT_ZOO")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    assert zoo.zoo_dir() == tmp_path / "cache" / "jaxckpt" / "zoo"


def test_publish_latest_by_default(tmp_path, zoo_root):
    run = _make_run(tmp_path / "run", [0.5, 0.2, 0.4])
    path = publish(run, "tiny")
    assert path == zoo_root / "tiny" / "checkpoints" / "30"
    assert (path / "state").is_dir()
    # Only the chosen step is copied.
    assert sorted(p.name for p in (zoo_root / "tiny" / "checkpoints").iterdir()) == ["30"]
    record = json.loads((zoo_root / "tiny" / "zoo.json").read_text())
    assert record["name"] == "tiny" and record["step"] == 30
    assert record["source"] == str(run.absolute())
    assert record["metrics"] == {"train/loss": pytest.approx(1.4), "val/loss": pytest.approx(0.4)}
    assert "jaxckpt_version" in record and "published_at" in record
    assert json.loads((zoo_root / "tiny" / "config.json").read_text())["task"] == "tests.tiny"


def test_a_published_entry_follows_the_umask(tmp_path, zoo_root):
    # mkdtemp stages entries with mode 0700: the renamed entry must be as readable as a mkdir'd one.
    run = _make_run(tmp_path / "run", [0.5])
    old = os.umask(0o022)
    try:
        zoo.publish(run, "shared")
    finally:
        os.umask(old)
    assert stat.S_IMODE((zoo_root / "shared").stat().st_mode) == 0o755


@pytest.mark.parametrize("step, expected", [("best", 20), (10, 10), ("latest", 30)])
def test_publish_selects_step(tmp_path, zoo_root, step, expected):
    run = _make_run(tmp_path / "run", [0.5, 0.2, 0.4])
    assert publish(run, "tiny", step=step).name == str(expected)


def test_publish_best_with_max_mode_override(tmp_path, zoo_root):
    run = _make_run(tmp_path / "run", [0.5, 0.2, 0.4])
    assert publish(run, "tiny", step="best", best_mode="max").name == "10"


def test_publish_a_step_directory(tmp_path, zoo_root):
    run = _make_run(tmp_path / "run", [0.5, 0.2])
    assert publish(run / "checkpoints" / "10", "tiny").name == "10"


def test_publish_unknown_step_lists_saved_steps(tmp_path, zoo_root):
    run = _make_run(tmp_path / "run", [0.5, 0.2])
    with pytest.raises(CheckpointNotFoundError, match=r"Step 99 .*\[10, 20\]"):
        publish(run, "tiny", step=99)
    assert not zoo_root.exists() or not list(zoo_root.iterdir())


def test_publish_refuses_to_overwrite_unless_asked(tmp_path, zoo_root):
    run = _make_run(tmp_path / "run", [0.5, 0.2, 0.4])
    publish(run, "tiny", step=10)
    with pytest.raises(FileExistsError, match="tiny.*overwrite"):
        publish(run, "tiny")
    assert zoo.resolve("zoo:tiny").name == "10"
    publish(run, "tiny", overwrite=True)
    assert zoo.resolve("zoo:tiny").name == "30"
    # Staging and replaced copies are gone; only the entry remains.
    assert [p.name for p in zoo_root.iterdir()] == ["tiny"]


@pytest.mark.parametrize("name", ["", "a/b", "..", "has space", "zoo:x"])
def test_invalid_names_are_rejected(tmp_path, zoo_root, name):
    run = _make_run(tmp_path / "run", [0.5])
    with pytest.raises(ValueError, match="not valid"):
        publish(run, name)


def test_list_entries_and_resolve(tmp_path, zoo_root):
    assert zoo.list_entries() == []
    run = _make_run(tmp_path / "run", [0.5, 0.2])
    publish(run, "b-model", step=10)
    publish(run, "a-model")
    (zoo_root / "not-an-entry").mkdir()
    entries = zoo.list_entries()
    assert [(e["name"], e["step"]) for e in entries] == [("a-model", 20), ("b-model", 10)]
    assert entries[1]["path"] == str(zoo_root / "b-model" / "checkpoints" / "10")
    assert zoo.resolve("zoo:b-model") == zoo_root / "b-model" / "checkpoints" / "10"
    assert zoo.resolve("runs/x") == pathlib.Path("runs/x").absolute()
    assert zoo.resolve(tmp_path) == tmp_path


def test_resolve_unknown_name_lists_available(tmp_path, zoo_root):
    with pytest.raises(zoo.ZooEntryNotFoundError, match="none"):
        zoo.resolve("zoo:nope")
    publish(_make_run(tmp_path / "run", [0.5]), "tiny")
    with pytest.raises(zoo.ZooEntryNotFoundError, match=r"'nope'.*Available: tiny"):
        zoo.resolve("zoo:nope")


def test_entry_is_self_contained(tmp_path, zoo_root):
    run = _make_run(tmp_path / "run", [0.5, 0.2])
    publish(run, "tiny", step="best")
    shutil.rmtree(run)
    step_dir = zoo.resolve("zoo:tiny")
    manager = CheckpointManager(step_dir.parent, read_only=True)
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype), _state(0))
    restored = manager.restore(target)
    np.testing.assert_array_equal(restored["params"]["dense"]["kernel"], np.full((2, 3), 20, np.float32))
    assert manager.restore_extra()["config"]["task"] == "tests.tiny"
    manager.close()
    # An entry can itself be published again under another name.
    assert publish("zoo:tiny", "tiny-copy").name == "20"
