"""How fast does jaxckpt restore a model-sharded state (8 devices, fsdp), next to plain Orbax?

Each candidate's checkpoint of the same fsdp-sharded state (see `sharded_save`) is restored onto
the same 8-device shardings, from a cold page cache. jaxckpt checks every array's XXH3 hash (its
default); plain Orbax checks nothing.

  python -m benchmarks.sharded_restore [--quick | --smoke]
"""

from __future__ import annotations

import pathlib
import shutil

from benchmarks import child, harness
from benchmarks.harness import MiB, Record
from benchmarks.sharded_save import DEVICES, sharded_state

NAME = "sharded_restore"


def measure(mode: str, directory: str) -> dict:
    """In a child with 8 devices: median seconds of each candidate's cold restore."""
    import jax
    import orbax.checkpoint as ocp

    from jaxckpt.checkpoint.manager import CheckpointManager

    assert jax.device_count() == DEVICES, jax.devices()
    size = harness.rounds(mode, 8 * MiB, 64 * MiB, 1024 * MiB)
    reps = harness.rounds(mode, 2, 5, 5)
    state = jax.block_until_ready(sharded_state(size, seed=1))
    total, count = sum(x.nbytes for x in jax.tree.leaves(state)), len(jax.tree.leaves(state))
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
    root = harness.fresh_dir(directory)
    dirs = {name: harness.fresh_dir(root / name) for name in ("jaxckpt", "orbax")}
    with CheckpointManager(dirs["jaxckpt"], async_save=False) as mngr:
        mngr.save(1, state)
    ckptr = ocp.StandardCheckpointer()
    ckptr.save(dirs["orbax"] / "1", state)
    ckptr.wait_until_finished()
    del state
    reader = CheckpointManager(dirs["jaxckpt"], read_only=True)

    def cold(name: str, read):
        return harness.timed_cold_read(dirs[name], read)

    candidates = {
        "jaxckpt": cold("jaxckpt", lambda: reader.restore(target, step=1)),
        "orbax": cold("orbax", lambda: ckptr.restore(dirs["orbax"] / "1", target)),
    }
    candidates["jaxckpt"]()  # warm-up
    seconds = harness.side_by_side(candidates, reps)
    reader.close()
    ckptr.close()
    shutil.rmtree(root, ignore_errors=True)
    return {"seconds": seconds, "bytes": total, "arrays": count}


def run(mode: str, workdir: pathlib.Path) -> list[Record]:
    got = child.call("benchmarks.sharded_restore:measure", mode, str(workdir / NAME), devices=DEVICES)
    speed = {k: harness.mbps(got["bytes"], v) for k, v in got["seconds"].items()}
    note = f"{got['bytes'] / MiB:.0f} MiB, {got['arrays']} arrays split over {DEVICES} devices (fsdp), cold cache"
    return harness.throughput_records(NAME, speed, {"orbax": f"plain Orbax StandardCheckpointer.restore ({note})"},
                                      "ratio >= 0.9")


if __name__ == "__main__":
    from benchmarks.run import main_for

    main_for(run)
