"""How fast does jaxckpt restore a large state, next to `np.load` and plain Orbax (and `torch.load`)?

Each candidate's files are written once, then every read starts from a cold page cache: the files
are evicted with `posix_fadvise(DONTNEED)` before each read (no root needed), so every candidate
reads from the disk. jaxckpt restores onto the target's device shardings and checks every array's
XXH3 hash (its default); `np.load` returns host arrays and checks nothing: the strict baseline.
The Orbax baselines are its defaults and the tuned set-up of `save_large.tuned_orbax`, each
reading its own checkpoint onto the same shardings.

  python -m benchmarks.restore_large [--quick | --smoke]
"""

from __future__ import annotations

import pathlib
import shutil

import jax
import numpy as np
import orbax.checkpoint as ocp

from benchmarks import harness
from benchmarks.harness import MiB, Record
from benchmarks.save_large import TUNED_ORBAX, has_torch, nbytes, np_save, state_of_size, torch_save, tuned_orbax
from jaxckpt.checkpoint.manager import CheckpointManager

NAME = "restore_large"


def _abstract(state):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)


def run(mode: str, workdir: pathlib.Path) -> list[Record]:
    size = harness.rounds(mode, 8 * MiB, 64 * MiB, 1024 * MiB)
    reps = harness.rounds(mode, 2, 5, 5)
    state = state_of_size(size, seed=1)
    total, count = nbytes(state), len(jax.tree.leaves(state))
    target = _abstract(state)
    root = harness.fresh_dir(workdir / NAME)
    dirs = {name: harness.fresh_dir(root / name) for name in ("numpy", "jaxckpt", "orbax", "orbax_tuned", "torch")}

    np_save(state, dirs["numpy"])
    with CheckpointManager(dirs["jaxckpt"], async_save=False) as mngr:
        mngr.save(1, state)
    ckptr = ocp.StandardCheckpointer()
    ckptr.save(dirs["orbax"] / "1", state)
    ckptr.wait_until_finished()
    tuned = tuned_orbax()
    tuned.save(dirs["orbax_tuned"] / "1", ocp.args.PyTreeSave(state))
    torch_ok = has_torch()
    if torch_ok:
        torch_save(state, dirs["torch"] / "state.pt")
    del state

    def np_load() -> list:
        return [np.load(dirs["numpy"] / f"{i}.npy") for i in range(count)]

    tuned_args = ocp.args.PyTreeRestore(target, restore_args=jax.tree.map(
        lambda x: ocp.ArrayRestoreArgs(sharding=x.sharding, global_shape=x.shape, dtype=x.dtype), target))

    # Opened before the clock starts, as a resuming trainer has it open already.
    reader = CheckpointManager(dirs["jaxckpt"], read_only=True)

    def torch_load():
        import torch

        return torch.load(dirs["torch"] / "state.pt")

    def cold(name: str, read):
        return harness.timed_cold_read(dirs[name], read)

    candidates = {
        "numpy": cold("numpy", np_load),
        "jaxckpt": cold("jaxckpt", lambda: reader.restore(target, step=1)),
        "orbax": cold("orbax", lambda: ckptr.restore(dirs["orbax"] / "1", target)),
        "orbax_tuned": cold("orbax_tuned", lambda: tuned.restore(dirs["orbax_tuned"] / "1", tuned_args)),
    }
    if torch_ok:
        candidates["torch"] = cold("torch", lambda: [t.numpy() for t in torch_load().values()])
    candidates["jaxckpt"]()  # warm-up: first-call costs (imports, thread pools) are not throughput
    before = harness.io_counters().get("read_bytes")
    t = harness.side_by_side(candidates, reps)
    after = harness.io_counters().get("read_bytes")
    reader.close()
    ckptr.close()
    tuned.close()
    shutil.rmtree(root, ignore_errors=True)
    if before is not None and after - before < 0.5 * total * reps * len(candidates):
        print(f"[{NAME}] warning: only {(after - before) / MiB:.0f} MiB came from the disk; the page "
              "cache was not evicted and every candidate read warm")
    speed = {k: harness.mbps(total, v) for k, v in t.items()}
    note = f"{total / MiB:.0f} MiB, {count} arrays, cold cache"
    return harness.throughput_records(NAME, speed, {
        "numpy": f"np.load per array ({note})",
        "orbax": "plain Orbax StandardCheckpointer.restore (defaults)",
        "orbax_tuned": TUNED_ORBAX,
        "torch": "torch.load",
    }, "ratio >= 0.9", goals={"orbax_tuned": "ratio >= 1.0"})


if __name__ == "__main__":
    from benchmarks.run import main_for

    main_for(run)
