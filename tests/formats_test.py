"""Run directories written by released versions (tests/fixtures/formats/) still read back."""

import pathlib

import pytest

import jaxckpt

FIXTURES = pathlib.Path(__file__).parent / "fixtures" / "formats"
RELEASES = sorted(p for p in FIXTURES.iterdir() if p.is_dir())


@pytest.mark.parametrize("run_dir", RELEASES, ids=[p.name for p in RELEASES])
def test_every_step_of_a_release_verifies(run_dir):
    manager = jaxckpt.CheckpointManager(run_dir / "checkpoints", read_only=True)
    assert manager.all_steps() == [2, 4, 6]
    for step in manager.all_steps():
        manager.verify(step)  # reads every array and checks its recorded XXH3
        assert manager.metadata(step)["params/head/kernel"].shape == (8, 10)
        assert manager.restore_extra(step)["config"]["train"]["num_steps"] == 6
