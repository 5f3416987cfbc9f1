"""What does a state of many small leaves cost to save and restore, next to plain Orbax?

A tree of N leaves of 4 KiB each (1024 float32; N = 4096, and 20480), saved synchronously then
restored onto the same device shardings, warm page cache (the files are small and fresh).
Candidates: plain Orbax's `StandardCheckpointer` (its defaults: OCDBT, zstd) and jaxckpt's
`CheckpointManager` (with its XXH3 hash of every leaf on save and restore). Figure: seconds for save +
restore; `ratio` = Orbax's time / jaxckpt's.

  python -m benchmarks.small_leaves [--quick | --smoke]
"""

from __future__ import annotations

import pathlib
import shutil

import jax
import numpy as np
import orbax.checkpoint as ocp

from benchmarks import harness
from benchmarks.harness import Record
from jaxckpt.checkpoint.manager import CheckpointManager

NAME = "small_leaves"
LEAF_FLOATS = 1024  # 4 KiB of float32


def many_leaves(n: int, seed: int = 0) -> dict:
    """`{"block_i": {"w_j": (1024,) float32}}` with 64 leaves per block: a deep-ish model's shape."""
    rng = np.random.default_rng(seed)
    flat = rng.standard_normal((n, LEAF_FLOATS), dtype=np.float32)
    tree = {f"block_{i // 64}": {} for i in range(n)}
    for i in range(n):
        tree[f"block_{i // 64}"][f"w_{i % 64}"] = flat[i]
    return jax.device_put(tree)


def _measure(n: int, reps: int, workdir: pathlib.Path) -> dict[str, float]:
    state = many_leaves(n)
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
    out = workdir / f"{NAME}_{n}"

    def jaxckpt_once() -> float:
        d = harness.fresh_dir(out)
        mngr = CheckpointManager(d, async_save=False)
        with harness.Stopwatch() as sw:
            mngr.save(1, state)
            jax.block_until_ready(mngr.restore(target, step=1))
        mngr.close()
        return sw.seconds

    def orbax_once() -> float:
        d = harness.fresh_dir(out)
        ckptr = ocp.StandardCheckpointer()
        with harness.Stopwatch() as sw:
            ckptr.save(d / "1", state)
            ckptr.wait_until_finished()
            jax.block_until_ready(ckptr.restore(d / "1", target))
        ckptr.close()
        return sw.seconds

    jaxckpt_once()  # warm-up
    t = harness.side_by_side({"orbax": orbax_once, "jaxckpt": jaxckpt_once}, reps)
    shutil.rmtree(out, ignore_errors=True)
    return t


def run(mode: str, workdir: pathlib.Path) -> list[Record]:
    sizes = harness.rounds(mode, (512,), (4096,), (4096, 20480))
    reps = harness.rounds(mode, 2, 3, 5)
    records = []
    for n in sizes:
        t = _measure(n, reps, workdir)
        name = NAME if n == 4096 or len(sizes) == 1 else f"{NAME}_{n // 1000}k"
        records.append(Record(name, t["jaxckpt"], "s", t["orbax"],
                              f"plain Orbax StandardCheckpointer save+restore, {n} leaves of 4 KiB",
                              t["orbax"] / t["jaxckpt"], "ratio >= 5"))
    return records


if __name__ == "__main__":
    from benchmarks.run import main_for

    main_for(run)
