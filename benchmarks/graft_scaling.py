"""Does planning and grafting stay linear in the number of leaves?

A source and a target of N leaves each (`block_i/layer_j/{kernel,bias}`, small float32 arrays),
mapped with one prefix rule and one skip pattern, so every path goes through the matcher.
`value`: seconds for `graft.plan` + `graft.graft` at 100k leaves (goal: under 1 s);
`ratio`: 10 * t(10k) / t(100k), 1.0 being linear (below 1: worse than linear).

  python -m benchmarks.graft_scaling [--quick | --smoke]
"""

from __future__ import annotations

import pathlib

import numpy as np

from benchmarks import harness
from benchmarks.harness import Record
from jaxckpt.grafting.graft import graft, plan

NAME = "graft_scaling"


def _tree(n: int, root: str) -> dict:
    leaf = np.zeros((2,), np.float32)
    per_block = 100
    return {root: {f"block_{b}": {f"layer_{i}": {"kernel": leaf, "bias": leaf}
                                  for i in range(per_block // 2)}
                   for b in range(max(n // per_block, 1))},
            "head": {"kernel": leaf}}


def _once(n: int) -> callable:
    source, target = _tree(n, "encoder"), _tree(n, "backbone")
    mapping = {"encoder": "backbone"}
    skip = [r"backbone/block_0/layer_0/.*"]

    def run() -> float:
        with harness.Stopwatch() as sw:
            plan(source, target, mapping=mapping, skip=skip)
            graft(source, target, mapping=mapping, skip=skip, strict=False)
        return sw.seconds
    return run


def run(mode: str, workdir: pathlib.Path) -> list[Record]:
    del workdir
    small, large = harness.rounds(mode, (1_000, 10_000), (10_000, 100_000), (10_000, 100_000))
    reps = harness.rounds(mode, 2, 3, 5)
    t = harness.side_by_side({"small": _once(small), "large": _once(large)}, reps)
    return [Record(NAME, t["large"], "s", t["small"],
                   f"seconds for plan+graft of {small // 1000}k leaves (baseline) vs {large // 1000}k (value); "
                   "ratio 1 = linear", (large / small) * t["small"] / t["large"], "value < 1 s")]


if __name__ == "__main__":
    from benchmarks.run import main_for

    main_for(run)
