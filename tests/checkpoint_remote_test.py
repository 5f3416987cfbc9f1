"""CheckpointManager on gs:// and s3:// (the emulators of tests/object_store.py, registered in conftest.py).

Saving, retention, best-k, reopening, bitwise restore, quarantine, read-only readers, plain Orbax
reading a step, and a save killed with SIGKILL half-way: the rerun never takes it for a step.
"""

import os
import signal
import socket
import subprocess
import sys
import textwrap
import time

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from jaxckpt.checkpoint import orbax_s3, storage
from jaxckpt.checkpoint.manager import CheckpointManager


@pytest.fixture(params=["gcs_emulator", "s3_emulator"])
def store_url(request):
    """A fresh directory URL on each store, per test (not `node.name`: fsspec globs its brackets)."""
    return f"{request.getfixturevalue(request.param)}/checkpoints/{request.node.originalname}"


def _state(seed: int) -> dict:
    key = jax.random.PRNGKey(seed)
    return {"params": {"w": jax.random.normal(key, (64, 32)), "b": jnp.full((32,), seed, jnp.bfloat16)},
            "step": jnp.asarray(seed, jnp.int32)}


def _equal(a, b) -> bool:
    return all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def test_save_retention_best_and_bitwise_restore(store_url):
    directory = f"{store_url}/ckpt"
    losses = {1: 0.5, 2: 0.2, 3: 0.4, 4: 0.3}
    with CheckpointManager(directory, max_to_keep=2, keep_best=1, best_metric="loss") as manager:
        assert str(manager.directory) == directory
        for step, loss in losses.items():
            manager.save(step, _state(step), metrics={"loss": loss}, extra={"position": step})
        assert manager.all_steps() == [2, 3, 4]  # the two latest, plus the best (2)
    # Deleted steps are gone from the bucket, not only from Orbax's list.
    names = sorted(p.name for p in storage.as_path(directory).iterdir())
    assert [n for n in names if n.isdigit()] == ["2", "3", "4"]
    assert all((storage.as_path(directory) / s / "commit_success.txt").exists() for s in ("2", "3", "4"))

    reader = CheckpointManager(directory, read_only=True)  # the ranking rule is read from the steps
    try:
        assert reader.best_step() == 2 and reader.latest_step() == 4
        assert _equal(reader.restore(_state(0), "latest"), _state(4))
        assert _equal(reader.restore(_state(0), "best"), _state(2))
        assert reader.restore_extra(3) == {"position": 3}
        assert reader.metrics(3) == {"loss": 0.4}
        reader.verify(4)
        assert set(reader.metadata(4)) == {"params/w", "params/b", "step"}
    finally:
        reader.close()


def test_plain_orbax_reads_a_step(store_url):
    directory = f"{store_url}/ckpt"
    with CheckpointManager(directory) as manager:
        manager.save(5, _state(5))
    path = storage.as_path(f"{directory}/5/state")
    with orbax_s3.orbax_s3():  # a no-op for gs://; plain Orbax 0.12.8 needs it on s3:// (README)
        ckptr = ocp.PyTreeCheckpointer()
        tree = ckptr.metadata(path).item_metadata.tree
        as_numpy = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
        restored = ckptr.restore(path, args=ocp.args.PyTreeRestore(restore_args=as_numpy))
    assert _equal(restored, _state(5))


def test_a_corrupt_step_is_quarantined_and_restore_falls_back(store_url):
    directory = f"{store_url}/ckpt"
    with CheckpointManager(directory, max_to_keep=-1) as manager:
        manager.save(1, _state(1))
        manager.save(2, _state(2))
        manager.wait()
        data = [p for p in storage.files_under(storage.as_path(directory) / "2" / "state") if "/d/" in str(p)]
        assert data, "the state item has no data file"
        for p in data:
            p.write_bytes(b"\0" * len(p.read_bytes()))
        with pytest.warns(UserWarning, match="corrupt"):
            restored = manager.restore(_state(0), "latest", fallback=True)
        assert _equal(restored, _state(1))
        assert manager.all_steps() == [1]
        aside = storage.as_path(directory) / "corrupt" / "2"
        assert (aside / "state" / "_METADATA").exists()  # moved aside, never deleted
        assert not (storage.as_path(directory) / "2").exists()


_KILLED_SAVE = textwrap.dedent("""
    import sys, time
    import jax, jax.numpy as jnp
    from jaxckpt.checkpoint.manager import CheckpointManager
    directory = sys.argv[1]
    manager = CheckpointManager(directory, async_save=False)
    manager.save(1, {"w": jnp.ones((8,)), "step": jnp.asarray(1)})
    print("committed", flush=True)
    # Big enough that the upload takes a while; the parent kills this process once step 2 appears.
    manager.save(2, {"w": jnp.ones((48, 1024, 1024), jnp.float32), "step": jnp.asarray(2)})
    print("finished", flush=True)
""")


@pytest.mark.parametrize("store", ["gcs_emulator", "s3_emulator"])
def test_a_save_killed_half_way_is_never_taken_for_a_step(request, store, tmp_path):
    directory = f"{request.getfixturevalue(store)}/checkpoints/killed"
    script = tmp_path / "save.py"
    script.write_text(_KILLED_SAVE)
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    child = subprocess.Popen([sys.executable, str(script), directory], stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert child.stdout.readline().strip() == "committed"
        step2 = storage.as_path(directory) / "2"
        deadline = time.monotonic() + 120
        while not step2.exists():  # the save of step 2 has started writing objects
            assert child.poll() is None, "the child finished before it could be killed"
            assert time.monotonic() < deadline
            time.sleep(0.05)
        child.send_signal(signal.SIGKILL)
    finally:
        child.kill()
        child.wait()
    assert not (step2 / "commit_success.txt").exists()

    with CheckpointManager(directory, async_save=False) as manager:
        assert manager.all_steps() == [1]
        assert not step2.exists(), "the killed save's objects are removed when the writer is gone"
        restored = manager.restore({"w": jnp.zeros((8,)), "step": jnp.asarray(0)})
        assert np.array_equal(restored["w"], np.ones(8))
        manager.save(2, {"w": jnp.full((8,), 2.0), "step": jnp.asarray(2)})  # the same step, saved again
        assert manager.all_steps() == [1, 2]


def test_a_reader_sees_steps_another_process_saved_after_it_listed(store_url, tmp_path):
    # fsspec caches listings forever by default, and other processes write behind it (storage._no_listing_cache).
    directory = f"{store_url}/ckpt"
    with CheckpointManager(directory) as writer:
        writer.save(1, _state(1))
    reader = CheckpointManager(directory, read_only=True)
    try:
        assert reader.all_steps() == [1]
        script = tmp_path / "save.py"
        script.write_text(textwrap.dedent("""
            import sys, jax.numpy as jnp
            from jaxckpt.checkpoint.manager import CheckpointManager
            with CheckpointManager(sys.argv[1], max_to_keep=1) as manager:
                manager.save(2, {"w": jnp.full((4,), 2.0)})
        """))
        subprocess.run([sys.executable, str(script), directory], check=True,
                       env={**os.environ, "PYTHONPATH": os.getcwd()})
        reader.reload()
        assert reader.all_steps() == [2]  # step 1 deleted by the other process's retention
        assert np.array_equal(reader.restore({"w": jnp.zeros(4)})["w"], np.full(4, 2.0))
    finally:
        reader.close()


_TWO_PROCESS_SAVE = textwrap.dedent("""
    import sys
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    from jaxckpt.runner import distributed
    directory, coordinator, process_id = sys.argv[1], sys.argv[2], int(sys.argv[3])
    distributed.initialize(coordinator, 2, process_id)
    from jaxckpt.checkpoint.manager import CheckpointManager
    mesh = Mesh(np.array(jax.devices()), ("fsdp",))  # 2 processes x 2 devices
    w = jax.make_array_from_callback((8, 6), NamedSharding(mesh, P("fsdp")),
                                     lambda index: np.arange(48.0).reshape(8, 6)[index])
    with CheckpointManager(directory) as manager:
        manager.save(3, {"w": w, "step": np.asarray(3, np.int32)})
    print("saved", flush=True)
""")


@pytest.mark.slow
def test_two_processes_save_their_own_shards_to_a_bucket_and_one_restores(gcs_emulator, tmp_path):
    directory = f"{gcs_emulator}/checkpoints/two_processes"
    script = tmp_path / "save.py"
    script.write_text(_TWO_PROCESS_SAVE)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        coordinator = f"127.0.0.1:{s.getsockname()[1]}"
    env = {**os.environ, "PYTHONPATH": os.getcwd(), "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    procs = [subprocess.Popen([sys.executable, str(script), directory, coordinator, str(i)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    outs = [p.communicate(timeout=240) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], "\n".join(err for _, err in outs)
    state = storage.as_path(directory) / "3" / "state"
    assert sorted(p.name for p in state.glob("ocdbt.process_*")) == ["ocdbt.process_0", "ocdbt.process_1"]
    assert (storage.as_path(directory) / "3" / "commit_success.txt").exists()
    with CheckpointManager(directory, read_only=True) as manager:  # this process: 4 devices, one host
        manager.verify(3)
        restored = manager.restore({"w": jax.ShapeDtypeStruct((8, 6), jnp.float32), "step": jnp.asarray(0)})
    assert np.array_equal(restored["w"], np.arange(48.0).reshape(8, 6))


def test_load_params_from_a_bare_orbax_checkpoint_in_a_bucket(store_url):
    from jaxckpt import load_params

    params = _state(4)["params"]
    url = f"{store_url}/bare"
    with orbax_s3.orbax_s3():  # what a plain-Orbax user on s3:// does (README); a no-op for gs://
        ckptr = ocp.StandardCheckpointer(atomicity_options=storage.atomicity_options(url))  # (no rename on s3)
        ckptr.save(storage.as_path(url), params)
        ckptr.wait_until_finished()
    target = jax.tree.map(jnp.zeros_like, params)
    loaded, report = load_params(url, target)
    assert _equal(loaded, params) and not report.missing
