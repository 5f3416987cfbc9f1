"""How much host memory does restoring a state of S bytes take, next to plain Orbax?

Each restore runs in a fresh process that has imported everything and opened the checkpoint but
read no array; the figure is (peak resident memory during the restore - resident memory before
it) / S, so the fixed overhead of imports and thread pools is left out. On CPU the restored
"device" arrays live in host memory too, so the restored state itself counts once: 1.0 is the
floor, and the goal is about 1.3.

  python -m benchmarks.restore_peak_rss [--quick | --smoke]
"""

from __future__ import annotations

import pathlib
import shutil

from benchmarks import child, harness
from benchmarks.harness import MiB, Record

NAME = "restore_peak_rss"


def write(size: int, directory: str) -> int:
    """Saves a state of `size` bytes with jaxckpt (`directory/jaxckpt`) and plain Orbax (`directory/orbax`)."""
    import orbax.checkpoint as ocp

    from benchmarks.save_large import nbytes, state_of_size
    from jaxckpt.checkpoint.manager import CheckpointManager

    state = state_of_size(size, seed=3)
    with CheckpointManager(pathlib.Path(directory) / "jaxckpt", async_save=False) as manager:
        manager.save(1, state)
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(pathlib.Path(directory) / "orbax" / "1", state)
    return nbytes(state)


def measure(which: str, directory: str, size: int) -> dict:
    """In a fresh process: restores one candidate's checkpoint; returns its resident-memory figures."""
    import jax
    import orbax.checkpoint as ocp

    from benchmarks.save_large import state_of_size
    from jaxckpt.checkpoint.manager import CheckpointManager

    target = jax.eval_shape(lambda: state_of_size(size, seed=3))  # shapes only: nothing allocated
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), target)
    if which == "jaxckpt":
        manager = CheckpointManager(pathlib.Path(directory) / "jaxckpt", read_only=True)
        restore = lambda: manager.restore(target, step=1)  # noqa: E731
    else:
        ckptr = ocp.StandardCheckpointer()
        restore = lambda: ckptr.restore(pathlib.Path(directory) / "orbax" / "1", target)  # noqa: E731
    harness.evict(directory)
    before = child.rss_bytes()
    restored = jax.block_until_ready(restore())
    peak = child.peak_rss_bytes()
    return {"before": before, "peak": peak, "after": child.rss_bytes(), "restored": len(jax.tree.leaves(restored))}


def run(mode: str, workdir: pathlib.Path) -> list[Record]:
    size = harness.rounds(mode, 16 * MiB, 256 * MiB, 1024 * MiB)
    root = harness.fresh_dir(workdir / NAME)
    total = child.call("benchmarks.restore_peak_rss:write", size, str(root))
    ratio = {}
    for which in ("jaxckpt", "orbax"):
        got = child.call("benchmarks.restore_peak_rss:measure", which, str(root), size)
        ratio[which] = (got["peak"] - got["before"]) / total
        print(f"[{NAME}] {which}: before {got['before'] / MiB:.0f} MiB, peak {got['peak'] / MiB:.0f} MiB, "
              f"after {got['after'] / MiB:.0f} MiB for a {total / MiB:.0f} MiB state "
              f"(peak - before = {ratio[which]:.2f} x state)")
    shutil.rmtree(root, ignore_errors=True)
    return [Record(NAME, ratio["jaxckpt"], "x state", ratio["orbax"],
                   f"plain Orbax StandardCheckpointer.restore ({total / MiB:.0f} MiB state, one process)",
                   ratio["orbax"] / ratio["jaxckpt"], "value < 1.3")]


if __name__ == "__main__":
    from benchmarks.run import main_for

    main_for(run)
