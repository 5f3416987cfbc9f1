"""Tests for jaxckpt.workdir's config comparison and log filters (the lock is tested in failure_test)."""

import logging

import ml_collections
import pytest

from jaxckpt.runner import workdir


def test_config_changes_compares_a_saved_config_with_a_live_one():
    live = ml_collections.ConfigDict({"model": {"fusion_dims": (64,)}, "train": {"num_steps": 600}, "seed": 0})
    saved = {"model": {"fusion_dims": [64]}, "train": {"num_steps": 400}, "data": {"target": "digit"}}
    # A tuple and the list JSON gives it back as are equal; a field one side lacks is "(absent)".
    assert workdir.config_changes(saved, live) == [
        ("data.target", "digit", "(absent)"), ("seed", "(absent)", 0), ("train.num_steps", 400, 600)]
    assert workdir.config_changes(live, live) == []
    assert workdir.config_changes(None, {"a": {"b": 1}}) == [("a.b", "(absent)", 1)]


def _record(level, msg, pathname):
    return logging.LogRecord("absl", level, pathname, 1, msg, ("/runs/x",), None)


@pytest.mark.parametrize("level, msg, path, kept", [
    (logging.WARNING, "Given directory is read only=%s", "/site-packages/orbax/checkpoint/checkpoint_manager.py", False),
    (logging.WARNING, "CheckpointManagerOptions.read_only=True, setting save_interval_steps=0.",
     "/site-packages/orbax/checkpoint/checkpoint_manager.py", False),
    # Anything else passes: errors, other Orbax warnings, the same words from elsewhere.
    (logging.ERROR, "Given directory is read only=%s", "/site-packages/orbax/checkpoint/checkpoint_manager.py", True),
    (logging.WARNING, "Failed to save %s", "/site-packages/orbax/checkpoint/checkpoint_manager.py", True),
    (logging.WARNING, "Given directory is read only=%s", "/home/me/train.py", True),
])
def test_only_orbax_read_only_notes_are_dropped(level, msg, path, kept):
    workdir.quiet_library_logs()
    absl_logger = logging.getLogger("absl")
    assert absl_logger.filter(_record(level, msg, path)) is kept
    workdir.quiet_library_logs()  # idempotent: one filter of each kind
    assert sum(isinstance(f, workdir._NoReadOnlyNotes) for f in absl_logger.filters) == 1


def test_remove_bookkeeping_removes_only_what_a_failed_run_created(tmp_path):
    run = tmp_path / "run"
    before = workdir.entries(run)
    assert before is None
    run.mkdir()
    for name in (".lock", "train.log"):
        (run / name).write_text("x")
    (run / "checkpoints").mkdir()
    assert workdir.remove_bookkeeping(run, before) and not run.exists()
    # Anything else new (a config.json, a checkpoint) means the run did something: all is kept.
    for extra in ("config.json", "checkpoints/10"):
        run.mkdir(exist_ok=True)
        (run / "checkpoints").mkdir(exist_ok=True)
        (run / "train.log").write_text("x")
        (run / extra).mkdir() if extra.startswith("checkpoints/") else (run / extra).write_text("{}")
        assert not workdir.remove_bookkeeping(run, None) and (run / "train.log").exists()
    # What was there before the run stays, and so does the folder.
    old = tmp_path / "old"
    old.mkdir()
    (old / "train.log").write_text("earlier run")
    before = workdir.entries(old)
    (old / ".lock").write_text("x")
    assert workdir.remove_bookkeeping(old, before)
    assert sorted(p.name for p in old.iterdir()) == ["train.log"]
