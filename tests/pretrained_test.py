"""Tests for jaxckpt.pretrained: path resolution and weights-only loading through graft."""

import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

from jaxckpt.checkpoint.manager import CheckpointManager
from jaxckpt.errors import CheckpointNotFoundError, UserError
from jaxckpt.runner.sources import load_pretrained
from jaxckpt.train.state import TrainState
from jaxckpt.weights import foreign, pretrained
from jaxckpt.weights.pretrained import load_params, resolve_checkpoint_path, resolve_step_dir

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


def _spy_on_reads(monkeypatch) -> list:
    """Records the sorted paths of every `_read_arrays` call; returns that list."""
    asked = []
    real = pretrained._read_arrays

    def spy(checkpoint, wanted):
        asked.append(sorted(wanted))
        return real(checkpoint, wanted)
    monkeypatch.setattr(pretrained, "_read_arrays", spy)
    return asked


def test_reads_only_what_the_graft_loads(run_dir, monkeypatch):
    asked = _spy_on_reads(monkeypatch)
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


def _assert_params_equal(got, want):
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        assert isinstance(a, jax.Array), type(a)
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_state_item_of_a_step_loads_that_step(run_dir):
    item = run_dir / "checkpoints" / "10" / "state"
    assert resolve_checkpoint_path(item) == (run_dir / "checkpoints", 10)
    params, report = load_params(item, jax.tree.map(jnp.zeros_like, _params(0)))
    assert report.ok
    _assert_params_equal(params, _params(10))


@pytest.fixture
def orbax_tree(tmp_path):
    """A bare Orbax PyTree checkpoint of params (no state/, no steps), as StandardCheckpointer writes it."""
    path = tmp_path / "bare"
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(path, _params(5))
    return path


def test_bare_orbax_tree_reads_only_the_loaded_arrays_onto_their_shardings(orbax_tree, monkeypatch):
    asked = _spy_on_reads(monkeypatch)
    sharding = jax.sharding.NamedSharding(jax.make_mesh((4,), ("d",)), P("d"))
    target = {"encoder": {"kernel": jax.ShapeDtypeStruct((8, 4), jnp.float32, sharding=sharding),
                          "bias": jax.ShapeDtypeStruct((4,), jnp.float32)},
              "head": {"kernel": jax.ShapeDtypeStruct((4, 9), jnp.float32)}}
    params, report = load_params(orbax_tree, target, strict=False)
    assert asked == [["encoder/bias", "encoder/kernel"]]  # the mismatched head is never read
    assert [e.path for e in report.mismatched] == ["head/kernel"]
    _assert_params_equal(params["encoder"], _params(5)["encoder"])
    assert params["encoder"]["kernel"].sharding.is_equivalent_to(sharding, 2)


def test_bare_orbax_tree_with_params_key_and_concrete_target(tmp_path):
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(tmp_path / "bare", {"params": _params(5), "step": 3})
    params, report = load_params(tmp_path / "bare", jax.tree.map(jnp.zeros_like, _params(0)))
    assert report.ok
    _assert_params_equal(params, _params(5))


def test_single_weight_sets_refuse_a_step(orbax_tree, tmp_path):
    with pytest.raises(ValueError, match=r"bare Orbax PyTree checkpoint.*step=10 applies only"):
        load_params(orbax_tree, _params(0), step=10)
    foreign.write_safetensors(_params(5), tmp_path / "w.safetensors")
    with pytest.raises(ValueError, match=r"a weights file.*step='best' applies only"):
        load_params(tmp_path / "w.safetensors", _params(0), step="best")


def test_safetensors_file_with_rename_reads_only_the_loaded_tensors(tmp_path, monkeypatch):
    path = tmp_path / "w.safetensors"
    foreign.write_safetensors(_params(5), path, layout="flax")
    real = foreign.read_foreign

    def never_read_head(*args, **kwargs):
        leaves = real(*args, **kwargs)
        leaves["head/kernel"]._read = lambda: pytest.fail("the mismatched head was read")
        return leaves
    monkeypatch.setattr(pretrained, "read_foreign", never_read_head)
    target = {"backbone": jax.tree.map(jnp.zeros_like, _params(0)["encoder"]), "head": {"kernel": jnp.zeros((4, 9))}}
    params, report = load_params(path, target, rename=[(r"encoder\.(.*)", r"backbone/\1")], strict=False)
    assert [e.path for e in report.mismatched] == ["head/kernel"]
    _assert_params_equal(params["backbone"], _params(5)["encoder"])
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), target)
    params, _ = load_params(path, abstract, rename={r"encoder\.(.*)": r"backbone/\1"}, strict=False)
    _assert_params_equal(params["backbone"], _params(5)["encoder"])


def test_torch_file_goes_to_the_torch_reader(tmp_path, monkeypatch):
    path = tmp_path / "w.pt"
    path.write_bytes(b"")
    monkeypatch.setitem(sys.modules, "torch", None)  # Makes `import torch` fail.
    with pytest.raises(ImportError, match="needs torch"):
        load_params(path, _params(0))


def test_missing_weights_file_and_misplaced_rename(run_dir, tmp_path):
    with pytest.raises(CheckpointNotFoundError, match="Weights file .*nope.safetensors does not exist"):
        load_params(tmp_path / "nope.safetensors", _params(0))
    with pytest.raises(ValueError, match=r"rename= maps the tensor names .* Drop rename"):
        load_params(run_dir, _params(0), rename={"a": "b"})


def _ck(**fields):
    return types.SimpleNamespace(**{"mapping": "", "skip": "", "strict": True, "adapters": "", "rename": "",
                                    **fields})


def test_load_pretrained_takes_what_load_params_takes(orbax_tree, tmp_path):
    params, report = load_pretrained(str(orbax_tree), jax.tree.map(jnp.zeros_like, _params(0)), _ck())
    assert report.ok
    _assert_params_equal(params, _params(5))
    foreign.write_safetensors(_params(5), tmp_path / "w.safetensors")
    params, _ = load_pretrained(str(tmp_path / "w.safetensors"), jax.tree.map(jnp.zeros_like, _params(0)), _ck())
    _assert_params_equal(params, _params(5))
    with pytest.raises(UserError, match=r"checkpoint.pretrained=.*nope.pt does not exist\.$"):
        load_pretrained(str(tmp_path / "nope.pt"), _params(0), _ck())
    with pytest.raises(UserError, match=r"(?s)Drop rename.*In a config these are"):
        load_pretrained(str(orbax_tree), _params(0), _ck(rename="a=>b"))
