"""Run directories written by released versions (tests/fixtures/formats/) still read back, forever.

Each fixture is a 6-step digits run (checkpoints 2, 4, 6) made by `make_release_fixture.sh COMMIT`:
v0.1.0-c6f4f0f is format 1 (the last release before formats were checked), v0.1.0-45c96e5 format 2.
Every one is verified, resumed (on a copy), evaluated, grafted from and inspected.
"""

import json
import pathlib
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

import jaxckpt
from experiments.configs import digits
from jaxckpt.checkpoint import formats, state_item
from jaxckpt.checkpoint.manager import CheckpointManager
from jaxckpt.errors import CheckpointFormatError
from tests.runs import ROOT, override

FIXTURES = pathlib.Path(__file__).parent / "fixtures" / "formats"
RELEASES = sorted(p for p in FIXTURES.iterdir() if p.is_dir())
FORMAT_OF = {"v0.1.0-c6f4f0f": 1, "v0.1.0-45c96e5": 2}
NEWEST = FIXTURES / max(FORMAT_OF, key=FORMAT_OF.get)


def _config(data_dir, **overrides):
    """The config the fixtures were trained with (make_release_fixture.sh)."""
    config = digits.get_config()
    return override(config, **{
        "data.data_dir": str(data_dir), "train.num_steps": 6, "checkpoint.every_steps": 2,
        "train.eval_every_steps": 2, "train.log_every_steps": 2, "train.batch_size": 16, "eval.batch_size": 64,
        "model.encoder_dims": (8,), "model.fusion_dims": (8,), **overrides})


def test_every_fixture_is_known():
    assert {p.name for p in RELEASES} == set(FORMAT_OF)
    assert formats.FORMAT == max(FORMAT_OF.values()) and set(FORMAT_OF.values()) <= set(formats.READS)


@pytest.mark.parametrize("run_dir", RELEASES, ids=[p.name for p in RELEASES])
def test_every_step_of_a_release_verifies(run_dir):
    manager = jaxckpt.CheckpointManager(run_dir / "checkpoints", read_only=True)
    assert manager.all_steps() == [2, 4, 6]
    for step in manager.all_steps():
        assert formats.step_format(run_dir / "checkpoints" / str(step))[0] == FORMAT_OF[run_dir.name]
        manager.verify(step)  # reads every array and checks its recorded XXH3
        assert manager.metadata(step)["params/head/kernel"].shape == (8, 10)
        assert manager.restore_extra(step)["config"]["train"]["num_steps"] == 6


@pytest.mark.slow
@pytest.mark.parametrize("run_dir", RELEASES, ids=[p.name for p in RELEASES])
def test_a_release_is_resumed_evaluated_and_grafted_from(run_dir, tmp_path, data_dir):
    workdir = shutil.copytree(run_dir, tmp_path / "run")
    # Resume with the default (background) saves, two steps further.
    state = jaxckpt.run(_config(data_dir, **{"train.num_steps": 8}), workdir)
    assert int(state.step) == 8
    log = (workdir / "train.log").read_text()
    assert "resuming from this workdir's latest checkpoint, step 6" in log
    assert not (workdir / "checkpoints" / "corrupt").exists()
    manager = CheckpointManager(workdir / "checkpoints", read_only=True)
    assert manager.all_steps() == [4, 6, 8]
    assert manager.info(8)["format"] == formats.FORMAT
    # The public evaluate(), holding no lock: it reads the original fixture and writes only its JSON.
    result = jaxckpt.evaluate(_config(data_dir, **{"run_type": "val"}), workdir)
    assert result["step"] == 8 and np.isfinite(result["loss"])
    # Graft the release's own params (read-only, straight from the committed fixture).
    target = {p: jax.ShapeDtypeStruct(x.shape, x.dtype) for p, x in
              jaxckpt.CheckpointManager(run_dir / "checkpoints", read_only=True).metadata(6).items()
              if p.startswith("params/")}
    params, report = jaxckpt.load_params(run_dir, jaxckpt.unflatten_dict({p[7:]: x for p, x in target.items()}))
    assert not report.mismatched and len(report.loaded) == len(target)
    assert params["head"]["kernel"].shape == (8, 10)


@pytest.mark.slow
@pytest.mark.parametrize("run_dir", RELEASES, ids=[p.name for p in RELEASES])
def test_a_release_is_inspected_and_verified_from_the_command_line(run_dir):
    for command in (["inspect", str(run_dir)], ["verify", str(run_dir)]):
        done = subprocess.run([sys.executable, "-m", "jaxckpt", *command], cwd=ROOT, capture_output=True,
                              text=True, timeout=180)
        assert done.returncode == 0, done.stderr[-3000:]
        assert "xxh3_64 checksum" in done.stdout and f"format {FORMAT_OF[run_dir.name]}" in done.stdout
    assert "integrity of step 6: ok" in subprocess.run(
        [sys.executable, "-m", "jaxckpt", "inspect", str(run_dir)], cwd=ROOT, capture_output=True, text=True,
        timeout=180).stdout


def _newest_copy(tmp_path):
    return shutil.copytree(NEWEST / "checkpoints", tmp_path / "checkpoints")


def test_a_step_of_a_newer_format_is_refused_never_quarantined(tmp_path):
    checkpoints = _newest_copy(tmp_path)
    info = checkpoints / "6" / "jaxckpt" / "metadata"
    info.write_text(json.dumps({**json.loads(info.read_text()), "format": 99, "jaxckpt_version": "9.0.0"}))
    target = {p: jax.ShapeDtypeStruct(x.shape, x.dtype) for p, x in
              CheckpointManager(checkpoints, read_only=True).metadata(4).items()}
    with CheckpointManager(checkpoints) as manager:
        for call in (manager.verify, manager.metadata, lambda step: manager.restore(
                jaxckpt.unflatten_dict(target), step=step, fallback=True)):
            with pytest.raises(CheckpointFormatError, match=r"written by jaxckpt 9\.0\.0 \(format 99\).*upgrade jaxckpt"):
                call("latest")
    assert sorted(p.name for p in checkpoints.iterdir()) == ["2", "4", "6"]


def test_a_step_with_older_checksums_is_read_without_them(tmp_path):
    # Builds before 0.1.0 recorded CRC-32C under the same layout name: not a mismatch, just unchecked.
    checkpoints = _newest_copy(tmp_path)
    metadata_file = checkpoints / "6" / "state" / "_METADATA"
    metadata = json.loads(metadata_file.read_text())
    record = metadata["custom_metadata"][state_item.CUSTOM_KEY]
    record["checksum"] = "crc32c"
    record["arrays"] = {p: [12345, dtype, shape] for p, (_, dtype, shape) in record["arrays"].items()}
    metadata_file.write_text(json.dumps(metadata))
    with CheckpointManager(checkpoints) as manager:
        manager.verify(6)
        target = {p: jax.ShapeDtypeStruct(x.shape, x.dtype) for p, x in manager.metadata(6).items()}
        restored = manager.restore(jaxckpt.unflatten_dict(target), fallback=True)
        assert manager.all_steps() == [2, 4, 6]
    assert restored["params"]["head"]["kernel"].shape == (8, 10)
