"""How fast does jaxckpt save a model-sharded state (8 devices, fsdp), next to plain Orbax?

The state's arrays are split along their first axis over an 8-device `fsdp` mesh (faked CPU
devices, in a child process), as `config.mesh.fsdp=8` shards params and optimizer state. Both
candidates write the same arrays to a fresh directory and are timed until the bytes are durable.
In one process every shard is addressable, so jaxckpt writes each array as one chunk; plain Orbax
writes one chunk per shard.

  python -m benchmarks.sharded_save [--quick | --smoke]
"""

from __future__ import annotations

import pathlib

from benchmarks import child, harness
from benchmarks.harness import MiB, Record

NAME = "sharded_save"
DEVICES = 8


def sharded_state(size: int, seed: int = 0):
    """`save_large.state_of_size` placed on an 8-device fsdp mesh, each array split by rows."""
    import jax
    from jax.sharding import NamedSharding, PartitionSpec

    from benchmarks.save_large import state_of_size
    from jaxckpt.runner.mesh import make_mesh

    mesh = make_mesh(data=1, fsdp=DEVICES)
    state = state_of_size(size, seed=seed)
    return jax.device_put(state, NamedSharding(mesh, PartitionSpec("fsdp")))


def measure(mode: str, directory: str) -> dict:
    """In a child with 8 devices: median seconds of each candidate's save."""
    import jax
    import orbax.checkpoint as ocp

    from jaxckpt.checkpoint.manager import CheckpointManager

    assert jax.device_count() == DEVICES, jax.devices()
    size = harness.rounds(mode, 8 * MiB, 64 * MiB, 1024 * MiB)
    reps = harness.rounds(mode, 2, 5, 5)
    state = jax.block_until_ready(sharded_state(size))
    out = pathlib.Path(directory)

    def timed(opener):
        return harness.timed_write(out, opener)

    def jaxckpt_save(target: pathlib.Path):
        mngr = CheckpointManager(target, async_save=False, max_to_keep=None)
        return lambda: mngr.save(1, state), mngr.close

    def orbax_save(target: pathlib.Path):
        ckptr = ocp.StandardCheckpointer()
        return lambda: (ckptr.save(target / "1", state), ckptr.wait_until_finished()), ckptr.close

    candidates = {"jaxckpt": timed(jaxckpt_save), "orbax": timed(orbax_save)}
    candidates["jaxckpt"]()  # warm-up
    seconds = harness.side_by_side(candidates, reps)
    return {"seconds": seconds, "bytes": sum(x.nbytes for x in jax.tree.leaves(state)),
            "arrays": len(jax.tree.leaves(state))}


def run(mode: str, workdir: pathlib.Path) -> list[Record]:
    got = child.call("benchmarks.sharded_save:measure", mode, str(workdir / NAME), devices=DEVICES)
    speed = {k: harness.mbps(got["bytes"], v) for k, v in got["seconds"].items()}
    note = f"{got['bytes'] / MiB:.0f} MiB, {got['arrays']} arrays split over {DEVICES} devices (fsdp)"
    return harness.throughput_records(NAME, speed, {"orbax": f"plain Orbax StandardCheckpointer ({note})"},
                                      "ratio >= 0.9")


if __name__ == "__main__":
    from benchmarks.run import main_for

    main_for(run)
