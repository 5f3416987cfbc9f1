"""Tests for jaxckpt.runner.rundir: removing what a failed run left (the lock is tested in failure_test)."""



from jaxckpt.runner import rundir


def test_remove_bookkeeping_removes_only_what_a_failed_run_created(tmp_path):
    run = tmp_path / "run"
    before = rundir.entries(run)
    assert before is None
    run.mkdir()
    for name in (".lock", "train.log"):
        (run / name).write_text("x")
    (run / "checkpoints").mkdir()
    assert rundir.remove_bookkeeping(run, before) and not run.exists()
    # Anything else new (a config.json, a checkpoint) means the run did something: all is kept.
    for extra in ("config.json", "checkpoints/10"):
        run.mkdir(exist_ok=True)
        (run / "checkpoints").mkdir(exist_ok=True)
        (run / "train.log").write_text("x")
        (run / extra).mkdir() if extra.startswith("checkpoints/") else (run / extra).write_text("{}")
        assert not rundir.remove_bookkeeping(run, None) and (run / "train.log").exists()
    # What was there before the run stays, and so does the folder.
    old = tmp_path / "old"
    old.mkdir()
    (old / "train.log").write_text("earlier run")
    before = rundir.entries(old)
    (old / ".lock").write_text("x")
    assert rundir.remove_bookkeeping(old, before)
    assert sorted(p.name for p in old.iterdir()) == ["train.log"]
