"""Tests for jaxckpt.checkpoint.storage: what a location may be, and file modes."""

import os
import stat

import jax.numpy as jnp
import pytest

import jaxckpt
from experiments.configs import digits
from jaxckpt.checkpoint import storage
from jaxckpt.checkpoint.manager import CheckpointManager
from jaxckpt.errors import UserError
from jaxckpt.weights import zoo
from jaxckpt.weights.pretrained import resolve_checkpoint_path


def test_dotdot_is_resolved_everywhere(tmp_path):
    # tensorstore refuses a path holding '..' ("Invalid file path"), after a whole run trained.
    (tmp_path / "a").mkdir()
    dotted = tmp_path / "a" / ".." / "checkpoints"
    assert storage.local_path(dotted) == tmp_path / "checkpoints"
    with CheckpointManager(dotted) as manager:
        assert manager.directory == tmp_path / "checkpoints"
        manager.save(1, {"w": jnp.ones(3)})
    assert resolve_checkpoint_path(tmp_path / "a" / ".." / "checkpoints" / "1") == (tmp_path / "checkpoints", 1)
    assert zoo.resolve(str(dotted)) == tmp_path / "checkpoints"


@pytest.mark.parametrize("url", ["gs://bucket/run", "s3://bucket/run", "https://example.com/run", "file:///tmp/x"])
def test_a_url_is_refused_before_anything_is_created(tmp_path, monkeypatch, url):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError, match=r"checkpoint.resume_file=.*is a URL; .*not supported yet"):
        storage.local_path(url, key="checkpoint.resume_file")
    with pytest.raises(UserError, match="is a URL"):
        CheckpointManager(url)
    with pytest.raises(UserError, match="is a URL"):
        jaxckpt.run(digits.get_config(), url)
    with pytest.raises(UserError, match="is a URL"):
        resolve_checkpoint_path(url)
    assert os.listdir(tmp_path) == []  # no folder named "gs:" or "s3:"


def test_give_default_mode_follows_the_umask(tmp_path):
    old = os.umask(0o027)
    try:
        (tmp_path / "f").write_text("x")
        os.chmod(tmp_path / "f", 0o600)
        storage.give_default_mode(tmp_path / "f")
        (tmp_path / "d").mkdir(mode=0o700)
        storage.give_default_mode(tmp_path / "d")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "f").stat().st_mode) == 0o640
    assert stat.S_IMODE((tmp_path / "d").stat().st_mode) == 0o750
