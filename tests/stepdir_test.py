"""Tests for jaxckpt.stepdir: reading one step directory's items and metadata without a manager."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxckpt
from jaxckpt import errors
from jaxckpt.checkpoint import stepdir
from jaxckpt.checkpoint.manager import CheckpointManager
from jaxckpt.train.state import TrainState


@pytest.fixture
def step_dir(tmp_path):
    """Step 7 of a run, saved with metrics {"loss": 0.5}."""
    params = {"dense": {"kernel": jnp.ones((2, 3), jnp.bfloat16), "bias": jnp.zeros(3)}}
    state = TrainState.create(apply_fn=None, params=params, tx=optax.sgd(0.1), rng=jax.random.PRNGKey(0))
    with CheckpointManager(tmp_path / "checkpoints") as manager:
        manager.save(7, state, metrics={"loss": 0.5})
    return tmp_path / "checkpoints" / "7"


def test_read_json_item_returns_the_saved_record_or_none(step_dir, tmp_path):
    assert stepdir.read_json_item(step_dir, "metrics") == {"loss": 0.5}
    assert stepdir.read_json_item(step_dir, "no_such_item") is None
    assert stepdir.read_json_item(tmp_path / "no_such_step", "metrics") is None


def test_read_state_metadata_gives_shapes_and_dtypes_by_path(step_dir):
    saved = stepdir.read_state_metadata(step_dir)
    assert saved["params/dense/kernel"].shape == (2, 3)
    assert saved["params/dense/kernel"].dtype == jnp.bfloat16
    assert saved["params/dense/bias"].shape == (3,) and saved["params/dense/bias"].dtype == np.float32
    assert saved["step"].shape == ()
    assert all(isinstance(v, jax.ShapeDtypeStruct) for v in saved.values())


def test_read_state_metadata_of_an_empty_directory_names_it(tmp_path):
    with pytest.raises(errors.CheckpointCorruptError, match=r"Cannot read the array metadata of .*state") as e:
        stepdir.read_state_metadata(tmp_path)
    assert str(tmp_path) in str(e.value) and "restore another step" in str(e.value)
    assert e.value.step_dir == tmp_path


def test_read_state_metadata_of_a_damaged_state_item_names_it(tmp_path):
    (tmp_path / stepdir.STATE_ITEM).mkdir()
    (tmp_path / stepdir.STATE_ITEM / "_METADATA").write_text("{not json")
    with pytest.raises(errors.CheckpointCorruptError, match="incomplete or damaged") as e:
        stepdir.read_state_metadata(tmp_path)
    assert str(tmp_path / stepdir.STATE_ITEM) in str(e.value)


def test_errors_are_the_public_ones_and_keep_their_standard_bases():
    # Callers catch them as jaxckpt.X, or as the built-in errors they extend; errors.py owns them all.
    from jaxckpt import errors

    assert jaxckpt.CheckpointNotFoundError is errors.CheckpointNotFoundError
    assert issubclass(errors.CheckpointNotFoundError, FileNotFoundError)
    assert issubclass(errors.CheckpointCorruptError, RuntimeError)
    assert issubclass(errors.CheckpointSaveError, RuntimeError)


def test_library_version_is_the_package_version():
    assert stepdir.library_version() == jaxckpt.__version__
