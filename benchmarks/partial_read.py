"""Loading only the encoder from a train-state checkpoint: how many bytes come off the disk?

A checkpoint of a full train state (params `encoder` + `head` of equal size, plus Adam-like
`mu`/`nu` for each) is written with `CheckpointManager`; then `jaxckpt.weights.pretrained.load_params`
grafts only `encoder` into a new model (`mapping={"encoder": "encoder"}`, `strict=False`).
Method: the checkpoint's files are evicted from the page cache (`posix_fadvise(DONTNEED)`), so
every byte the load needs comes from the disk, and `read_bytes` of `/proc/self/io` (all threads
of this process, block-layer reads, including the kernel's read-ahead) is compared before and
after. `ratio` = encoder bytes / bytes read (1.0: nothing but the encoder was read).

  python -m benchmarks.partial_read [--quick | --smoke]
"""

from __future__ import annotations

import pathlib
import shutil

import jax
import numpy as np

from benchmarks import harness
from benchmarks.harness import MiB, Record
from jaxckpt.checkpoint.manager import CheckpointManager
from jaxckpt.weights.pretrained import load_params

NAME = "partial_read"


def _arrays(total_bytes: int, n: int, rng: np.random.Generator) -> dict:
    return {f"w{i}": rng.standard_normal((total_bytes // n // 4,), dtype=np.float32) for i in range(n)}


def run(mode: str, workdir: pathlib.Path) -> list[Record]:
    size = harness.rounds(mode, 4 * MiB, 32 * MiB, 256 * MiB)
    reps = harness.rounds(mode, 1, 3, 3)
    rng = np.random.default_rng(0)
    params = {"encoder": _arrays(size, 8, rng), "head": _arrays(size, 8, rng)}
    state = {"step": np.int32(100), "params": params,
             "opt_state": {"mu": jax.tree.map(np.copy, params), "nu": jax.tree.map(np.copy, params)}}
    root = harness.fresh_dir(workdir / NAME)
    with CheckpointManager(root / "checkpoints", async_save=False) as mngr:
        mngr.save(100, jax.device_put(state))
    encoder_bytes = sum(x.nbytes for x in jax.tree.leaves(params["encoder"]))
    saved_bytes = sum(p.stat().st_size for p in harness.files_under(root / "checkpoints"))
    target = {"encoder": jax.tree.map(np.zeros_like, params["encoder"]),
              "new_head": np.zeros((10, 10), np.float32)}

    def once() -> float:
        harness.evict(root)
        before = harness.io_counters()["read_bytes"]
        loaded, report = load_params(root, target, mapping={"encoder": "encoder"}, strict=False)
        jax.block_until_ready(loaded)
        read = harness.io_counters()["read_bytes"] - before
        if len(report.loaded) != len(params["encoder"]):
            raise AssertionError(f"expected {len(params['encoder'])} loaded leaves, got {report}")
        return read

    if not harness.io_counters():
        raise RuntimeError("/proc/self/io is not readable here; cannot count bytes read")
    read = harness.side_by_side({"jaxckpt": once}, reps)["jaxckpt"]
    shutil.rmtree(root, ignore_errors=True)
    return [Record(NAME, read / MiB, "MiB read", encoder_bytes / MiB,
                   f"encoder bytes (the ideal), of a {saved_bytes / MiB:.0f} MiB checkpoint",
                   encoder_bytes / read if read else float("inf"), "ratio >= 0.909")]


if __name__ == "__main__":
    from benchmarks.run import main_for

    main_for(run)
