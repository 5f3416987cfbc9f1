"""Tests for jaxckpt.pretrained: path resolution and weights-only loading through graft."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxckpt import pretrained
from jaxckpt.checkpoint import CheckpointManager, CheckpointNotFoundError
from jaxckpt.pretrained import load_params, resolve_checkpoint_path, resolve_step_dir
from jaxckpt.state import TrainState

P = jax.sharding.PartitionSpec


def _params(seed, head=3, width=4):
    k1, k2, k3 = jax.random.split(jax.random.PRNGKey(seed), 3)
    return {"encoder": {"kernel": jax.random.normal(k1, (8, width)), "bias": jax.random.normal(k2, (width,))},
            "head": {"kernel": jax.random.normal(k3, (width, head))}}


@pytest.fixture
def run_dir(tmp_path):
    """A run directory with steps 10 (loss 0.2) and 20 (loss 0.5), params from seeds 10 and 20."""
    with CheckpointManager(tmp_path / "checkpoints", best_metric="loss") as mngr:
        for step, loss in ((10, 0.2), (20, 0.5)):
            state = TrainState.create(apply_fn=None, params=_params(step), tx=optax.adam(1e-3),
                                      rng=jax.random.PRNGKey(0))
            mngr.save(step, state, metrics={"loss": loss})
    return tmp_path


def test_resolve_run_checkpoint_and_step_dirs(run_dir):
    ckpts = run_dir / "checkpoints"
    assert resolve_checkpoint_path(run_dir) == (ckpts, None)
    assert resolve_checkpoint_path(ckpts) == (ckpts, None)
    assert resolve_checkpoint_path(ckpts / "20") == (ckpts, 20)
    assert resolve_step_dir(run_dir) == ckpts / "20"
    assert resolve_step_dir(run_dir, "best", best_metric="loss") == ckpts / "10"
    assert resolve_step_dir(run_dir, 10) == ckpts / "10"


def test_resolve_errors_say_what_was_expected(tmp_path, run_dir):
    with pytest.raises(CheckpointNotFoundError, match="does not exist; expected a run directory"):
        resolve_checkpoint_path(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointNotFoundError, match="holds no checkpoint; expected"):
        resolve_checkpoint_path(tmp_path / "empty")
    with pytest.raises(CheckpointNotFoundError, match=r"Step 15 is not in .*saved steps: \[10, 20\]"):
        resolve_step_dir(run_dir, 15)
    with pytest.raises(ValueError, match="best_metric"):
        resolve_step_dir(run_dir, "best")


def test_load_whole_tree(run_dir):
    target = jax.tree.map(jnp.zeros_like, _params(0))
    params, report = load_params(run_dir, target)
    assert report.ok and report.counts["loaded"] == 3
    for got, want in zip(jax.tree.leaves(params), jax.tree.leaves(_params(20))):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_load_step_and_mapping(run_dir):
    target = {"backbone": jax.tree.map(jnp.zeros_like, _params(0)["encoder"]), "cls": jnp.zeros((4, 5))}
    params, report = load_params(run_dir / "checkpoints" / "10", target, mapping={"encoder": "backbone"},
                                 strict=False)
    np.testing.assert_array_equal(np.asarray(params["backbone"]["kernel"]),
                                  np.asarray(_params(10)["encoder"]["kernel"]))
    assert not np.asarray(params["cls"]).any()
    assert report.counts["loaded"] == 2 and report.counts["untouched"] == 1


def test_strict_fails_before_reading_any_array(run_dir, monkeypatch):
    def no_reads(*args, **kwargs):
        raise AssertionError("no array may be read when the plan fails")
    monkeypatch.setattr(pretrained, "_read_arrays", no_reads)
    target = jax.tree.map(jnp.zeros_like, _params(0, head=7))
    with pytest.raises(ValueError, match=r"(?s)mismatched.*head/kernel"):
        load_params(run_dir, target)


def test_reads_only_what_the_graft_loads(run_dir, monkeypatch):
    asked = []
    real = pretrained._read_arrays

    def spy(step_dir, wanted):
        asked.append(sorted(wanted))
        return real(step_dir, wanted)
    monkeypatch.setattr(pretrained, "_read_arrays", spy)
    target = jax.tree.map(jnp.zeros_like, _params(0, head=7))  # head is mismatched: kept fresh
    params, report = load_params(run_dir, target, strict=False)
    assert asked == [["params/encoder/bias", "params/encoder/kernel"]]
    assert [e.path for e in report.mismatched] == ["head/kernel"]
    assert params["head"]["kernel"].shape == (4, 7) and not np.asarray(params["head"]["kernel"]).any()


def _rchar():
    with open("/proc/self/io") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("rchar"))


@pytest.mark.skipif(not __import__("os").path.exists("/proc/self/io"), reason="needs Linux /proc I/O counters")
def test_bytes_read_are_about_the_encoder(tmp_path):
    big = {"encoder": {"kernel": jax.random.normal(jax.random.PRNGKey(1), (256, 512))},
           "head": {"kernel": jax.random.normal(jax.random.PRNGKey(2), (512, 512))}}
    state = TrainState.create(apply_fn=None, params=big, tx=optax.adam(1e-3), rng=jax.random.PRNGKey(0))
    state = state.apply_gradients(grads=big)  # non-zero Adam moments, so they are as big as params
    with CheckpointManager(tmp_path) as mngr:
        mngr.save(1, state)
    target = {"encoder": {"kernel": jnp.zeros((256, 512))}, "head": {"kernel": jnp.zeros((512, 2))}}
    before = _rchar()
    load_params(tmp_path, target, mapping={"encoder": "encoder"}, strict=False)
    read = _rchar() - before
    encoder_bytes = 256 * 512 * 4
    assert read < 1.2 * encoder_bytes + 200_000, (read, encoder_bytes)


def test_abstract_sharded_target_gets_arrays_on_its_sharding(run_dir):
    mesh = jax.make_mesh((4,), ("d",))
    sharding = jax.sharding.NamedSharding(mesh, P("d"))
    target = {"encoder": {"kernel": jax.ShapeDtypeStruct((8, 4), jnp.bfloat16, sharding=sharding),
                          "bias": jax.ShapeDtypeStruct((4,), jnp.float32, sharding=sharding)},
              "head": {"kernel": jax.ShapeDtypeStruct((4, 9), jnp.float32)}}
    params, report = load_params(run_dir, target, strict=False, step=10)
    kernel = params["encoder"]["kernel"]
    assert isinstance(kernel, jax.Array) and kernel.dtype == jnp.bfloat16
    assert kernel.sharding.is_equivalent_to(sharding, kernel.ndim)
    np.testing.assert_allclose(np.asarray(kernel, np.float32), np.asarray(_params(10)["encoder"]["kernel"]),
                               rtol=1e-2)
    assert isinstance(params["head"]["kernel"], jax.ShapeDtypeStruct)  # not loaded: the caller inits it
    assert [e.path for e in report.mismatched] == ["head/kernel"]


def test_abstract_target_without_sharding_gets_jax_arrays(run_dir):
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), _params(0))
    params, report = load_params(run_dir, target, step=10)
    assert report.ok and report.counts["loaded"] == 3
    for got, want in zip(jax.tree.leaves(params), jax.tree.leaves(_params(10))):
        assert isinstance(got, jax.Array), type(got)
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_adapter_onto_abstract_target_fails_before_reading(run_dir, monkeypatch):
    def no_reads(*args, **kwargs):
        raise AssertionError("no array may be read when an adapter has no fresh value to fill from")
    monkeypatch.setattr(pretrained, "_read_arrays", no_reads)
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), _params(0, head=7))
    with pytest.raises(ValueError, match=r"adapters reshape \['head/kernel'\].*Pass initialised arrays"):
        load_params(run_dir, target, adapters={"head": "resize"})


def test_adapter_onto_concrete_target_resizes(run_dir):
    target = jax.tree.map(jnp.zeros_like, _params(0, head=7))
    params, report = load_params(run_dir, target, adapters={"head": "resize"}, step=10)
    assert [e.path for e in report.adapted] == ["head/kernel"]
    head = np.asarray(params["head"]["kernel"])
    np.testing.assert_array_equal(head[:, :3], np.asarray(_params(10)["head"]["kernel"]))
    assert not head[:, 3:].any()
