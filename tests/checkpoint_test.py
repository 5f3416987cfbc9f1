"""Tests for jaxckpt.checkpoint, jaxckpt.retention and jaxckpt.stepdir."""

import errno
import json
import os
import socket
import subprocess
import sys
import textwrap
import time

import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxckpt.checkpoint import manager as ckpt
from jaxckpt.checkpoint import state_item, state_read
from jaxckpt.checkpoint.manager import CheckpointManager
from jaxckpt.errors import CheckpointCorruptError, CheckpointNotFoundError, CheckpointSaveError
from jaxckpt.train.state import TrainState
from jaxckpt.tree import treepath

P = jax.sharding.PartitionSpec
NAN, INF = float("nan"), float("inf")


def _state(seed=0, step=0):
    k1, k2 = jax.random.split(jax.random.PRNGKey(seed))
    params = {"enc": {"kernel": jax.random.normal(k1, (8, 4)), "bias": jnp.arange(4.0)},
              "head": {"kernel": jax.random.normal(k2, (4, 2))}}
    state = TrainState.create(apply_fn=None, params=params, tx=optax.adam(1e-2), rng=jax.random.PRNGKey(seed))
    state = state.apply_gradients(grads=jax.tree.map(jnp.ones_like, params))
    return state.replace(step=jnp.asarray(step, jnp.int32))


def _abstract(state, sharding=None):
    def leaf(x):
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)
    return jax.tree.map(leaf, jax.eval_shape(lambda: state))


def _assert_same(a, b):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.fixture(params=["fast", "orbax"])
def writer(request, monkeypatch):
    """Each test using it runs with the fast writer and with Orbax's own handler (the fallback)."""
    monkeypatch.setenv(state_item.FAST_WRITER_ENV, "1" if request.param == "fast" else "0")
    return request.param


def _save_all(mngr, steps_metrics):
    state = _state()
    for step, metrics in steps_metrics:
        mngr.save(step, state, metrics=metrics)
    mngr.wait()


# Saving, restoring, retention on disk.

def test_roundtrip_with_extra_metrics_and_metadata(tmp_path, writer):
    state = _state(step=5)
    with CheckpointManager(tmp_path, best_metric="loss") as mngr:
        mngr.save(5, state, metrics={"loss": jnp.float32(0.25)}, extra={"config": {"lr": 0.1}, "data": [1, 2]})
        restored = mngr.restore(_abstract(state))
        assert isinstance(restored, TrainState) and restored.tx is state.tx  # static fields from the target
        _assert_same(restored, state)
        assert mngr.restore_extra(5) == {"config": {"lr": 0.1}, "data": [1, 2]}
        assert mngr.metrics(5) == {"loss": 0.25}
        sums = mngr.checksums(5)
        assert set(sums) == set(treepath.flatten(flax.serialization.to_state_dict(state)))
        assert sums["params/enc/kernel"][1:] == ["float32", [8, 4]]
        assert "jaxckpt_version" in mngr.info(5)
        meta = mngr.metadata(5)
        assert meta["params/enc/kernel"].shape == (8, 4) and meta["step"].dtype == np.int32
        assert "opt_state/0/mu/head/kernel" in meta
    items = sorted(os.listdir(tmp_path / "5"))
    assert {"state", "extra", "jaxckpt", "metrics"} <= set(items)


def test_restore_concrete_target_and_static_fields_kept(tmp_path):
    state = _state(seed=1)
    with CheckpointManager(tmp_path, async_save=False) as mngr:
        mngr.save(1, state)
        target = _state(seed=2).replace(tx=optax.sgd(0.1))
        restored = mngr.restore(target)
    _assert_same(restored.params, state.params)
    assert restored.tx is target.tx


@pytest.mark.parametrize("mode, losses, best", [("min", [0.5, 0.1, 0.9, 0.8, 0.7], 2),
                                                 ("max", [0.5, 0.1, 0.9, 0.8, 0.7], 3)])
def test_best_survives_and_latest_kept_across_restart(tmp_path, mode, losses, best):
    kwargs = dict(max_to_keep=2, keep_best=1, best_metric="loss", best_mode=mode)
    with CheckpointManager(tmp_path, **kwargs) as mngr:
        _save_all(mngr, [(s, {"loss": v}) for s, v in enumerate(losses[:3], start=1)])
        assert mngr.best_step() == best
    with CheckpointManager(tmp_path, **kwargs) as mngr:  # a restart knows the best from disk
        assert mngr.best_step() == best
        _save_all(mngr, [(s, {"loss": v}) for s, v in enumerate(losses[3:], start=4)])
        assert mngr.all_steps() == sorted({best, 4, 5})
        assert mngr.latest_step() == 5 and mngr.best_step() == best
    assert sorted(int(d) for d in os.listdir(tmp_path) if d.isdigit()) == sorted({best, 4, 5})


def test_nan_inf_and_missing_metrics_are_never_best(tmp_path):
    with CheckpointManager(tmp_path, max_to_keep=1, keep_best=1, best_metric="loss") as mngr:
        _save_all(mngr, [(1, {"loss": NAN}), (2, None), (3, {"loss": -INF})])
        assert mngr.best_step() is None
        with pytest.raises(CheckpointNotFoundError, match="finite metrics"):
            mngr.restore(_abstract(_state()), step="best")
        _save_all(mngr, [(4, {"loss": 0.3}), (5, {"loss": NAN})])
        assert mngr.all_steps() == [4, 5] and mngr.best_step() == 4


def test_latest_kept_when_best_is_older(tmp_path):
    with CheckpointManager(tmp_path, max_to_keep=1, keep_best=1, best_metric="acc", best_mode="max") as mngr:
        _save_all(mngr, [(1, {"acc": 0.9}), (2, {"acc": 0.1}), (3, {"acc": 0.2})])
        assert mngr.all_steps() == [1, 3]


def test_keep_all_and_keep_every(tmp_path):
    with CheckpointManager(tmp_path / "all", max_to_keep=-1) as mngr:
        _save_all(mngr, [(s, None) for s in range(1, 6)])
        assert mngr.all_steps() == [1, 2, 3, 4, 5]
    with CheckpointManager(tmp_path / "every", max_to_keep=1, keep_every_steps=2) as mngr:
        _save_all(mngr, [(s, None) for s in range(1, 6)])
        assert mngr.all_steps() == [2, 4, 5]


def test_async_save_returns_before_commit(tmp_path, monkeypatch, writer):
    # Every commit (Orbax's rename of the finished save into place) waits 2 s, on whichever thread
    # commits: a synchronous save would block save() for those 2 s and return with step 1 in place.
    from orbax.checkpoint._src.path import atomicity

    finalize = atomicity.AtomicRenameTemporaryPath.finalize

    async def slow_finalize(self, *args, **kwargs):
        time.sleep(2.0)
        return await finalize(self, *args, **kwargs)

    monkeypatch.setattr(atomicity.AtomicRenameTemporaryPath, "finalize", slow_finalize)
    # lr_multipliers label optimizer state "x0.1": such a state must stay on the async path too.
    state = _state()
    state = state.replace(opt_state={"x0.1": state.opt_state, "train": state.opt_state})
    with CheckpointManager(tmp_path) as mngr:
        started = time.monotonic()
        mngr.save(1, state)
        returned = time.monotonic() - started
        assert returned < 1.5, f"save() took {returned:.1f} s: it waited for the commit"
        assert not (tmp_path / "1").exists(), "step 1 was committed before save() returned"
        mngr.wait()
        assert (tmp_path / "1" / "state").is_dir()
        assert not list(tmp_path.glob("*orbax-checkpoint-tmp*"))
        assert mngr.info(1)["writer"] == writer


# Topology changes.

@pytest.mark.parametrize("n_devices", [2, 1])
def test_restore_onto_other_mesh(tmp_path, n_devices):
    assert jax.device_count() >= 4, "conftest fakes 4 CPU devices"
    mesh4 = jax.make_mesh((4,), ("d",))
    state = _state()
    state = state.replace(params=jax.tree.map(
        lambda x: jax.device_put(x, jax.sharding.NamedSharding(mesh4, P("d"))), state.params))
    with CheckpointManager(tmp_path) as mngr:
        mngr.save(1, state)
        mesh = jax.make_mesh((n_devices,), ("d",), devices=jax.devices()[:n_devices])
        sharding = jax.sharding.NamedSharding(mesh, P("d"))
        target = _abstract(state, jax.sharding.NamedSharding(mesh, P()))
        target = target.replace(params=jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), target.params))
        restored = mngr.restore(target)
    kernel = restored.params["enc"]["kernel"]
    assert kernel.sharding == sharding and len(kernel.sharding.device_set) == n_devices
    _assert_same(restored, state)


def test_plain_orbax_reads_state_without_jaxckpt(tmp_path, writer):
    mesh4 = jax.make_mesh((4,), ("d",))
    state = _state()
    state = state.replace(params=jax.tree.map(
        lambda x: jax.device_put(x, jax.sharding.NamedSharding(mesh4, P("d"))), state.params))
    with CheckpointManager(tmp_path) as mngr:
        mngr.save(7, state, extra={"note": "hi"})
    # The module docstring's snippet, run on one device in a process that never imports jaxckpt.
    snippet = ckpt.__doc__.split("any number of devices:\n")[1].split("\n\n")[0]
    script = textwrap.dedent(snippet).replace("WORKDIR/checkpoints/100", str(tmp_path / "7")) + textwrap.dedent("""
        import json, sys
        assert "jaxckpt" not in sys.modules
        extra = json.loads(open(path.replace("/state", "/extra/metadata")).read())
        print(json.dumps({"kernel": params["enc"]["kernel"].tolist(), "extra": extra}))
    """)
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True,
                         cwd=tmp_path, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    np.testing.assert_array_equal(np.asarray(result["kernel"]), np.asarray(state.params["enc"]["kernel"]))
    assert result["extra"] == {"note": "hi"}


# Failure safety.

def test_leftover_tmp_directories_are_cleaned_on_open(tmp_path):
    with CheckpointManager(tmp_path) as mngr:
        mngr.save(1, _state())
    leftover = tmp_path / "2.orbax-checkpoint-tmp-1234" / "state"
    leftover.mkdir(parents=True)
    (leftover / "junk").write_text("half written")
    with CheckpointManager(tmp_path) as mngr:
        assert mngr.all_steps() == [1]
        assert not (tmp_path / "2.orbax-checkpoint-tmp-1234").exists()


def test_a_live_writers_save_in_flight_is_left_alone(tmp_path):
    # Another process has the directory open (its writer record names a live pid) and is saving.
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (tmp_path / f".jaxckpt-writer.{socket.gethostname()}.{other.pid}").touch()
        in_flight = tmp_path / "2.orbax-checkpoint-tmp-1234" / "state"
        in_flight.mkdir(parents=True)
        with CheckpointManager(tmp_path) as mngr:
            assert mngr.all_steps() == []
        assert in_flight.is_dir()
    finally:
        other.kill()
        other.wait()
    # Once that writer is gone, its record is stale and its unfinished save is removed.
    with CheckpointManager(tmp_path):
        assert not in_flight.parent.exists()
    assert os.listdir(tmp_path) == []


def _fail_json_writes(monkeypatch, exc):
    from orbax.checkpoint._src.handlers import json_checkpoint_handler

    async def fail(self, x, directory):
        raise exc
    monkeypatch.setattr(json_checkpoint_handler.JsonCheckpointHandler, "_save_fn", fail)


def test_disk_full_in_background_save_is_clear_and_keeps_earlier(tmp_path, monkeypatch):
    mngr = CheckpointManager(tmp_path, best_metric="loss")
    mngr.save(1, _state(), metrics={"loss": 1.0})
    mngr.wait()
    _fail_json_writes(monkeypatch, OSError(errno.ENOSPC, "No space left on device"))
    mngr.save(2, _state(), metrics={"loss": 0.5})  # async: returns, fails in the background
    with pytest.raises(CheckpointSaveError, match=r"disk is full") as info:
        mngr.wait()
    assert str(tmp_path / "2") in str(info.value) and "[1]" in str(info.value)
    monkeypatch.undo()
    # (and this manager's writer record, `.jaxckpt-writer.HOST.PID`, until it closes)
    assert mngr.all_steps() == [1] and sorted(p for p in os.listdir(tmp_path) if p[0] != ".") == ["1"]
    mngr.close()
    assert sorted(os.listdir(tmp_path)) == ["1"]
    with CheckpointManager(tmp_path, best_metric="loss") as mngr:
        mngr.save(2, _state(seed=3), metrics={"loss": 0.5})  # the failed step can be saved again
        _assert_same(mngr.restore(_abstract(_state()), step=2), _state(seed=3))
        assert mngr.all_steps() == [1, 2] and mngr.best_step() == 2


def test_background_error_surfaces_on_next_save(tmp_path, monkeypatch):
    mngr = CheckpointManager(tmp_path)
    _fail_json_writes(monkeypatch, RuntimeError("boom"))
    mngr.save(1, _state())
    with pytest.raises(CheckpointSaveError, match="step 1.*boom"):
        mngr.save(2, _state())
    monkeypatch.undo()
    mngr.save(2, _state())
    mngr.close()
    assert mngr.all_steps() == [2]


def _data_files(step_dir):
    files = [p for p in (step_dir / "state").rglob("*") if p.is_file() and p.parent.name == "d"]
    return sorted(files, key=lambda p: p.stat().st_size)


def _flip_array_bytes(step_dir, array):
    """Flips one byte inside `array`'s stored bytes, in every data file that holds them.

    Orbax may leave unreferenced copies of a write in its data files, so a byte flipped at an
    arbitrary offset can land where no reader looks; the array's own bytes are always read.
    """
    needle = np.asarray(array).tobytes()
    hits = 0
    for path in _data_files(step_dir):
        data = bytearray(path.read_bytes())
        at = data.find(needle)
        while at >= 0:
            data[at + len(needle) // 2] ^= 0xFF
            hits += 1
            at = data.find(needle, at + 1)
        path.write_bytes(bytes(data))
    assert hits, f"the bytes of the array are in no data file under {step_dir}"


def test_flipped_byte_in_an_array_fails_its_checksum(tmp_path, writer):
    # 16 KiB: small values are inlined in OCDBT's b-tree nodes, which tensorstore checks itself;
    # larger ones go to data files that nothing but our checksum checks.
    state = {"params": {"big": jnp.arange(4096.0).reshape(64, 64)}, "step": jnp.asarray(3)}
    with CheckpointManager(tmp_path) as mngr:
        mngr.save(1, state)
        mngr.wait()
        _flip_array_bytes(tmp_path / "1", state["params"]["big"])
        with pytest.raises(CheckpointCorruptError, match=rf"{tmp_path / '1'}.*differ from the checksums.*params/big"):
            mngr.restore(jax.eval_shape(lambda: state), step=1)
        with pytest.raises(CheckpointCorruptError, match="differ from the checksums.*params/big"):
            mngr.verify(1)


def test_truncated_data_file_raises_naming_directory(tmp_path, writer):
    state = _state()
    with CheckpointManager(tmp_path) as mngr:
        mngr.save(1, state)
        mngr.wait()
        for big in _data_files(tmp_path / "1"):
            big.write_bytes(big.read_bytes()[: big.stat().st_size // 2])
        with pytest.raises(CheckpointCorruptError, match=str(tmp_path / "1")):
            mngr.restore(_abstract(state), step=1)
        with pytest.raises(CheckpointCorruptError):
            mngr.verify(1)


def test_checksum_catches_silently_changed_values(tmp_path, monkeypatch):
    state = _state()
    with CheckpointManager(tmp_path) as mngr:
        mngr.save(1, state)
        mngr.wait()
        metadata_file = tmp_path / "1" / "state" / "_METADATA"
        metadata = json.loads(metadata_file.read_text())
        metadata["custom_metadata"]["jaxckpt"]["arrays"]["params/enc/bias"][0] = "0" * 16  # as if the bytes had changed
        metadata_file.write_text(json.dumps(metadata))
        with pytest.raises(CheckpointCorruptError, match="params/enc/bias"):
            mngr.restore(_abstract(state))
        restored = mngr.restore(_abstract(state), verify=False)
    _assert_same(restored, state)


def test_fallback_moves_corrupt_aside_and_restores_previous(tmp_path, writer):
    first, second = _state(seed=1), _state(seed=2)
    with CheckpointManager(tmp_path, max_to_keep=3) as mngr:
        mngr.save(1, first)
        mngr.save(2, second)
        mngr.wait()
        _flip_array_bytes(tmp_path / "2", second.params["head"]["kernel"])
        with pytest.warns(UserWarning, match="corrupt"):
            restored = mngr.restore(_abstract(first), fallback=True)
        _assert_same(restored, first)
        assert mngr.all_steps() == [1]
        assert (tmp_path / "corrupt" / "2" / "state").is_dir()
        mngr.save(2, second)  # the step number is free again
        mngr.wait()
        _flip_array_bytes(tmp_path / "2", second.params["head"]["kernel"])
        with pytest.warns(UserWarning):
            _assert_same(mngr.restore(_abstract(first), fallback=True), first)
        assert (tmp_path / "corrupt" / "2.1").is_dir()


# Errors for users.

def test_errors_name_directory_and_what_exists(tmp_path):
    with CheckpointManager(tmp_path) as mngr:
        with pytest.raises(CheckpointNotFoundError, match="holds no step directories"):
            mngr.restore(_abstract(_state()))
        with pytest.raises(ValueError, match="best_metric=None"):
            mngr.restore(_abstract(_state()), step="best")
        mngr.save(3, _state())
        with pytest.raises(CheckpointNotFoundError, match=r"Step 4 is not in .*saved steps: \[3\]"):
            mngr.restore(_abstract(_state()), step=4)
        with pytest.raises(ValueError, match="already saved"):
            mngr.save(3, _state())
        with pytest.raises(TypeError, match="JSON"):
            mngr.save(4, _state(), extra={"array": np.ones(2)})


def test_structure_mismatch_lists_paths(tmp_path):
    with CheckpointManager(tmp_path) as mngr:
        mngr.save(1, _state())
        other = _abstract(_state()).replace(params={"enc": {"kernel": jax.ShapeDtypeStruct((8, 5), jnp.float32)}})
        with pytest.raises(ValueError, match=r"(?s)saved but not in the target.*params/head/kernel.*"
                                             r"shape differs.*params/enc/kernel: saved \(8, 4\)"):
            mngr.restore(other)


def test_read_only_manager(tmp_path):
    with pytest.raises(CheckpointNotFoundError, match="does not exist"):
        CheckpointManager(tmp_path / "missing", read_only=True)
    with CheckpointManager(tmp_path, best_metric="loss") as mngr:
        _save_all(mngr, [(1, {"loss": 0.2}), (2, {"loss": 0.4})])
    leftover = tmp_path / "3.orbax-checkpoint-tmp"
    leftover.mkdir()
    with CheckpointManager(tmp_path, best_metric="loss", read_only=True) as mngr:
        assert mngr.best_step() == 1 and mngr.latest_step() == 2
        with pytest.raises(ValueError, match="read-only"):
            mngr.save(3, _state())
    assert leftover.exists()  # a reader never cleans up after a writer


def test_checksums_cover_every_array_and_detect_change():
    flat = {"a": np.arange(6, dtype=np.float32).reshape(2, 3), "b": jnp.ones(3, jnp.bfloat16)}
    sums = state_item.checksums(flat)
    assert sums["a"][1:] == ["float32", [2, 3]] and sums["b"][1] == "bfloat16"
    changed = dict(flat, a=flat["a"] + 1)
    assert state_read.mismatched_checksums(sums, changed) == ["a"]
    assert state_read.mismatched_checksums(sums, flat) == []
    assert len(sums["a"][0]) == 16 and int(sums["a"][0], 16) >= 0  # XXH3-64 as hex
