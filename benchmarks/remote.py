"""How fast does jaxckpt save and restore on `gs://`, next to plain Orbax's `CheckpointManager`?

The same tree as `save_large`, on a local GCS emulator that this benchmark starts and stops itself
(tests/gcs_emulator_patched.py, in memory on 127.0.0.1, one request at a time): the figures say
what each side costs in requests and round trips, not what a real bucket's bandwidth allows.
Both sides are managers opened before the clock starts, as a trainer opens one for the run.
Plain Orbax commits a step with a `commit_success.txt` marker (`AtomicityMode.COMMIT_FILE`, what
it picks itself on `gs://` and what jaxckpt uses on every object store); it runs once with its
defaults and once tuned as in `save_large.tuned_orbax`. A save is timed until the manager says it
is finished (an object store has no fsync: an acknowledged upload is durable); a restore from a
manager opened on a finished step, jaxckpt checking every array's XXH3 hash (its default). The
emulator is started with tests/object_store.py's launcher, so this needs the repository's
`tests/` and the `test` extras (gcp-storage-emulator, gcsfs). The measuring runs in a child process, so the emulator's
endpoint variables (and the gcsfs and tensorstore clients that read them once) stay out of the
runner's process.

  python -m benchmarks.remote [--quick | --smoke]
"""

from __future__ import annotations

import pathlib
import uuid

from benchmarks import child, harness
from benchmarks.harness import MiB, Record

NAME = "remote"


def _orbax_manager(directory, *, tuned: bool):
    """Plain Orbax's `CheckpointManager` on `directory`: its defaults, or tuned (no async, zarr3, no zstd)."""
    import orbax.checkpoint as ocp

    commit_file = ocp.options.AtomicityOptions(mode=ocp.options.AtomicityMode.COMMIT_FILE)
    if not tuned:
        return ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(
            max_to_keep=None, atomicity_options=commit_file))
    return ocp.CheckpointManager(
        directory, item_handlers=ocp.PyTreeCheckpointHandler(use_ocdbt=True, use_zarr3=True, use_compression=False),
        options=ocp.CheckpointManagerOptions(max_to_keep=None, enable_async_checkpointing=False,
                                             atomicity_options=commit_file))


def measure(mode: str, base_url: str) -> dict:
    """In a child pointed at the emulator: median seconds of each candidate's save and restore."""
    import jax
    import orbax.checkpoint as ocp
    from etils import epath

    from benchmarks.restore_large import _abstract
    from benchmarks.save_large import nbytes, state_of_size
    from jaxckpt.checkpoint.manager import CheckpointManager

    size = harness.rounds(mode, 2 * MiB, 16 * MiB, 256 * MiB)
    reps = harness.rounds(mode, 2, 5, 5)
    state = jax.block_until_ready(state_of_size(size))
    target = _abstract(state)

    def timed_save(open_and_save):
        def once() -> float:
            directory = epath.Path(f"{base_url}/save/{uuid.uuid4().hex}")
            save, close = open_and_save(directory)
            with harness.Stopwatch() as sw:
                save()
            close()
            directory.rmtree()  # the emulator keeps everything in memory
            return sw.seconds
        return once

    def orbax_save(tuned: bool):
        def open_and_save(directory):
            mngr = _orbax_manager(directory, tuned=tuned)
            args = ocp.args.PyTreeSave(state) if tuned else ocp.args.StandardSave(state)
            return lambda: (mngr.save(1, args=args), mngr.wait_until_finished()), mngr.close
        return open_and_save

    def jaxckpt_save(directory):
        mngr = CheckpointManager(directory, async_save=False, max_to_keep=None)
        return lambda: mngr.save(1, state), mngr.close

    saves = {"jaxckpt": timed_save(jaxckpt_save), "orbax": timed_save(orbax_save(False)),
             "orbax_tuned": timed_save(orbax_save(True))}
    saves["jaxckpt"]()  # warm-up: the first requests open connections and thread pools
    save_seconds = harness.side_by_side(saves, reps)

    readers = {}
    for name, tuned in (("orbax", False), ("orbax_tuned", True)):
        directory = epath.Path(f"{base_url}/restore/{name}")
        with _orbax_manager(directory, tuned=tuned) as mngr:
            mngr.save(1, args=ocp.args.PyTreeSave(state) if tuned else ocp.args.StandardSave(state))
            mngr.wait_until_finished()
        readers[name] = _orbax_manager(directory, tuned=tuned)
    directory = f"{base_url}/restore/jaxckpt"
    with CheckpointManager(directory, async_save=False) as mngr:
        mngr.save(1, state)
    readers["jaxckpt"] = CheckpointManager(directory, read_only=True)
    tuned_args = ocp.args.PyTreeRestore(target, restore_args=jax.tree.map(
        lambda x: ocp.ArrayRestoreArgs(sharding=x.sharding, global_shape=x.shape, dtype=x.dtype), target))
    restore = {
        "orbax": lambda: readers["orbax"].restore(1, args=ocp.args.StandardRestore(target)),
        "orbax_tuned": lambda: readers["orbax_tuned"].restore(1, args=tuned_args),
        "jaxckpt": lambda: readers["jaxckpt"].restore(target, step=1),
    }

    def timed_restore(name):
        def once() -> float:
            with harness.Stopwatch() as sw:
                jax.block_until_ready(restore[name]())
            return sw.seconds
        return once

    restores = {name: timed_restore(name) for name in readers}
    restores["jaxckpt"]()  # warm-up
    restore_seconds = harness.side_by_side(restores, reps)
    for reader in readers.values():
        reader.close()
    epath.Path(base_url).rmtree(missing_ok=True)
    return {"save": save_seconds, "restore": restore_seconds, "bytes": nbytes(state),
            "arrays": len(jax.tree.leaves(state))}


def run(mode: str, workdir: pathlib.Path) -> list[Record]:
    del workdir  # everything lives in the emulator's memory
    from tests import object_store

    process, endpoint = object_store.start_gcs_emulator()
    try:
        got = child.call("benchmarks.remote:measure", mode, f"gs://{object_store.BUCKET}/bench-{uuid.uuid4().hex}",
                         env=object_store.gcs_environment(endpoint))
    finally:
        object_store.stop_emulator(process)
    note = f"{got['bytes'] / MiB:.0f} MiB, {got['arrays']} arrays, GCS emulator"
    records = []
    for op in ("save", "restore"):
        speed = {k: harness.mbps(got["bytes"], v) for k, v in got[op].items()}
        records += harness.throughput_records(f"remote_{op}", speed, {
            "orbax": f"plain Orbax CheckpointManager.{op} (defaults, commit file; {note})",
            "orbax_tuned": f"plain Orbax CheckpointManager.{op}, tuned as save_large's orbax_tuned",
        }, None)
    return records


if __name__ == "__main__":
    from benchmarks.run import main_for

    main_for(run)
