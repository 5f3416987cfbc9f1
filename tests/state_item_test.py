"""Tests for jaxckpt.checkpoint.state_item and state_read: Orbax's PyTree format, written and read back."""

import json

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import orbax.checkpoint as ocp
import pytest
import tensorstore as ts

from jaxckpt.checkpoint import state_item, state_read
from jaxckpt.checkpoint.manager import CheckpointManager

P = jax.sharding.PartitionSpec


def _tree():
    mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:2]), ("d",))
    return {
        "step": jnp.asarray(7, jnp.int32),
        "params": {
            "enc": {"kernel": jnp.arange(12.0).reshape(3, 4), "bias": jnp.ones(4, jnp.bfloat16)},
            "sharded": jax.device_put(jnp.arange(8.0), jax.sharding.NamedSharding(mesh, P("d"))),
            "big": jnp.arange(300_000, dtype=jnp.float32),  # over the direct-write size: the zarr path
        },
        "opt_state": {"frozen": {}, "count": np.asarray([3], np.int64)},
        "model_state": None,
    }


def _kv_contents(item_dir):
    kvstore = ts.KvStore.open({"driver": "ocdbt", "base": {"driver": "file", "path": str(item_dir) + "/"}}).result()
    return {key: kvstore.read(key).result().value for key in kvstore.list().result()}


def _orbax_write(tree, path):
    ckptr = ocp.Checkpointer(ocp.PyTreeCheckpointHandler(use_compression=False))
    ckptr.save(path, args=ocp.args.PyTreeSave(tree))


def test_writes_what_orbax_writes(tmp_path):
    tree = _tree()
    assert state_item.can_write(tree)
    _orbax_write(tree, tmp_path / "orbax")
    state_item.write(tmp_path / "ours", state_item.to_host(tree))
    ours, theirs = _kv_contents(tmp_path / "ours"), _kv_contents(tmp_path / "orbax")
    # Orbax writes the sharded array as one chunk per shard; every other key is byte-identical.
    sharded = {k for k in theirs if k.startswith(b"params.sharded/")}
    assert {k: v for k, v in theirs.items() if k not in sharded} == {
        k: v for k, v in ours.items() if not k.startswith(b"params.sharded/")}
    assert json.loads(ours[b"params.sharded/.zarray"])["chunks"] == [8]
    assert np.frombuffer(ours[b"params.sharded/0"], np.float32).tolist() == list(range(8))
    meta = {d: json.loads((tmp_path / d / "_METADATA").read_text()) for d in ("ours", "orbax")}
    sharded_key = "('params', 'sharded')"
    assert meta["orbax"]["tree_metadata"][sharded_key]["value_metadata"]["write_shape"] == [4]  # per shard
    meta["orbax"]["tree_metadata"][sharded_key]["value_metadata"]["write_shape"] = [8]  # ours: one chunk
    assert meta["ours"]["tree_metadata"] == meta["orbax"]["tree_metadata"]
    assert {k: v for k, v in meta["ours"].items() if k != "custom_metadata"} == {
        k: v for k, v in meta["orbax"].items() if k != "custom_metadata"}
    shardings = {d: json.loads((tmp_path / d / "_sharding").read_text()) for d in ("ours", "orbax")}
    assert shardings["ours"] == shardings["orbax"]


def test_plain_orbax_reads_it(tmp_path):
    tree = _tree()
    state_item.write(tmp_path, state_item.to_host(tree))
    ckptr = ocp.PyTreeCheckpointer()
    metadata = ckptr.metadata(tmp_path).item_metadata.tree
    as_numpy = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), metadata)
    restored = ckptr.restore(tmp_path, args=ocp.args.PyTreeRestore(restore_args=as_numpy))
    assert restored["model_state"] is None and restored["opt_state"]["frozen"] == {}
    for got, want in zip(jax.tree.leaves(restored), jax.tree.leaves(tree)):
        assert got.dtype == want.dtype
        np.testing.assert_array_equal(got, np.asarray(want))


def test_read_arrays_casts_and_places(tmp_path):
    tree = _tree()
    state_item.write(tmp_path, state_item.to_host(tree))
    sharding = tree["params"]["sharded"].sharding
    got = state_read.read_arrays(tmp_path, {
        "params/sharded": (None, sharding),
        "params/enc/bias": (np.float32, None),
        "params/big": (None, None),
    })
    assert got["params/sharded"].sharding == sharding
    assert got["params/enc/bias"].dtype == np.float32 and isinstance(got["params/enc/bias"], np.ndarray)
    np.testing.assert_array_equal(got["params/big"], np.arange(300_000, dtype=np.float32))
    assert set(state_read.layout_arrays(tmp_path)) == {
        "step", "params/enc/kernel", "params/enc/bias", "params/sharded", "params/big", "opt_state/count"}


def test_a_damaged_chunk_is_an_error_not_garbage(tmp_path):
    state_item.write(tmp_path, state_item.to_host({"a": jnp.arange(4.0)}))
    kvstore = ts.KvStore.open({"driver": "ocdbt", "base": {"driver": "file", "path": str(tmp_path) + "/"}}).result()
    kvstore.write("a/0", b"\0" * 3).result()
    with pytest.raises(ValueError, match="holds 3 bytes, expected 16"):
        state_read.read_arrays(tmp_path, {"a": (None, None)})


@pytest.mark.parametrize("tree", [
    {"a.b": jnp.ones(2), "a": {"b": jnp.zeros(2)}},  # both named "a.b" once keys are joined with "."
    {"a": 3},  # a Python scalar
    {"a": np.ones(2, np.complex64)},  # a dtype this writer does not name
])
def test_orbax_saves_what_this_writer_does_not(tmp_path, tree):
    assert not state_item.can_write(tree)
    with CheckpointManager(tmp_path) as manager:
        manager.save(1, tree)
    assert state_read.layout_arrays(tmp_path / "1" / "state") is None
    assert (tmp_path / "1" / "state" / "_METADATA").exists()


def test_keys_with_dots_take_the_fast_writer_and_plain_orbax_reads_them(tmp_path):
    # lr_multipliers label optimizer state "x0.1": such a state must keep the fast (background) path.
    tree = {"opt_state": {"x0.1": {"mu": jnp.arange(6.0)}, "train": {"mu": jnp.ones(3)}}, "step": jnp.int32(2)}
    assert state_item.unwritable(tree) is None
    with CheckpointManager(tmp_path) as manager:
        manager.save(1, tree)
    item = tmp_path / "1" / "state"
    assert state_read.layout_arrays(item) is not None  # written by the fast writer
    ckptr = ocp.PyTreeCheckpointer()
    as_numpy = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), ckptr.metadata(item).item_metadata.tree)
    restored = ckptr.restore(item, args=ocp.args.PyTreeRestore(restore_args=as_numpy))
    np.testing.assert_array_equal(restored["opt_state"]["x0.1"]["mu"], np.arange(6.0))
    with CheckpointManager(tmp_path, read_only=True) as manager:
        manager.verify(1)
        np.testing.assert_array_equal(manager.restore(jax.eval_shape(lambda: tree))["opt_state"]["x0.1"]["mu"],
                                      np.arange(6.0))


def test_async_save_keeps_the_values_of_donated_arrays(tmp_path):
    state = {"w": jnp.arange(1000.0)}
    step = jax.jit(lambda s: {"w": s["w"] * 0 - 1}, donate_argnums=0)
    with CheckpointManager(tmp_path, async_save=True) as manager:
        manager.save(1, state)
        state = step(state)  # reuses the saved buffer while the write may still run
        state = step(state)
    restored = manager_restore(tmp_path)
    np.testing.assert_array_equal(restored["w"], np.arange(1000.0, dtype=np.float32))


def manager_restore(directory):
    with CheckpointManager(directory, read_only=True) as manager:
        manager.verify(1)
        target = {"w": jax.ShapeDtypeStruct((1000,), jnp.float32)}
        return manager.restore(target, step=1)


def test_bfloat16_name_round_trips():
    assert state_item.dtype_of("bfloat16") == np.dtype(ml_dtypes.bfloat16)
    assert state_item.dtype_of("<f4") == np.float32


def _raise_import_error():
    raise ImportError("No module named 'orbax.checkpoint._src.futures'")


@pytest.mark.parametrize("how, reason", [
    ("env", "JAXCKPT_FAST_WRITER=0"),
    ("version", "orbax-checkpoint 0.13.0 is outside the range the fast writer is tested with (>=0.12.8,<0.13)"),
    ("import", "Orbax internals it needs are gone (ImportError"),
])
def test_the_fast_writer_steps_aside_and_orbax_writes_the_same_files(tmp_path, monkeypatch, caplog, how, reason):
    if how == "env":
        monkeypatch.setenv(state_item.FAST_WRITER_ENV, "0")
    elif how == "version":
        monkeypatch.setattr(ocp, "__version__", "0.13.0")
    else:
        monkeypatch.setattr(state_item, "_orbax_internals", _raise_import_error)
    assert reason in state_item.fast_writer_off()
    tree = {"params": {"w": jnp.arange(12.0).reshape(3, 4)}, "step": jnp.int32(1)}
    with caplog.at_level("INFO", logger="jaxckpt"):
        with CheckpointManager(tmp_path) as manager:  # async_save=True: through Orbax's async path
            manager.save(1, tree)
            assert manager.info(1)["writer"] == "orbax"
    assert reason in caplog.text
    item = tmp_path / "1" / "state"
    assert state_read.layout_arrays(item) is None  # not the fast layout, but the same checksums
    assert set(state_read.checkable(state_read.read_custom_metadata(item))) == {"params/w", "step"}
    with CheckpointManager(tmp_path, read_only=True) as manager:
        manager.verify(1)
        restored = manager.restore(jax.eval_shape(lambda: tree))
    np.testing.assert_array_equal(restored["params"]["w"], np.arange(12.0).reshape(3, 4))
