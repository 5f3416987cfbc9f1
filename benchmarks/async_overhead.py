"""What does an async checkpoint every 100 steps cost a training run, and how long does it block?

A synthetic MLP (square float32 layers, Adam, batch 64) trains for N steps three ways in each
round: without checkpoints, and with `CheckpointManager(async_save=True).save` every 100 steps
(the state is donated to the next step, as the loop does). Steps/s is timed from the first step
after compilation to the last step's result; the background write of the last save is waited
for outside the window only when it would fall past the end (saves land at 100, 200, ... < N).
Also reported: the time `save` blocks the caller (async) vs a synchronous save of the same state,
and the XXH3 checksums jaxckpt computes on the host at save time.

  python -m benchmarks.async_overhead [--quick | --smoke]
"""

from __future__ import annotations

import pathlib
import shutil
import statistics

import jax
import jax.numpy as jnp
import numpy as np
import optax

from benchmarks import harness
from benchmarks.harness import MiB, Record
from jaxckpt.checkpoint import state_item
from jaxckpt.checkpoint.manager import CheckpointManager

NAME = "async_overhead"
EVERY = 100


def _model(width: int, depth: int):
    tx = optax.adam(1e-3)
    keys = jax.random.split(jax.random.PRNGKey(0), depth)
    params = {f"layer_{i}": {"kernel": jax.random.normal(k, (width, width)) / np.sqrt(width),
                             "bias": jnp.zeros((width,))} for i, k in enumerate(keys)}
    state = {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": tx.init(params)}

    def loss_fn(params, x):
        h = x
        for i in range(depth):
            h = jnp.tanh(h @ params[f"layer_{i}"]["kernel"] + params[f"layer_{i}"]["bias"])
        return jnp.mean((h - x) ** 2)

    def step(state, x):
        loss, grads = jax.value_and_grad(loss_fn)(state["params"], x)
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        return {"step": state["step"] + 1, "params": optax.apply_updates(state["params"], updates),
                "opt_state": opt_state}, loss

    return state, jax.jit(step, donate_argnums=0)


def run(mode: str, workdir: pathlib.Path) -> list[Record]:
    width, depth = harness.rounds(mode, (256, 4), (512, 8), (1024, 16))
    steps = harness.rounds(mode, 150, 250, 550)
    reps = harness.rounds(mode, 1, 3, 5)
    init_state, step = _model(width, depth)
    state_bytes = sum(x.nbytes for x in jax.tree.leaves(init_state))
    x = jax.random.normal(jax.random.PRNGKey(1), (64, width))
    ckpt_dir = workdir / NAME
    blocking: list[float] = []

    def train(save: bool) -> float:
        state = jax.tree.map(jnp.copy, init_state)
        state, loss = step(state, x)  # compiled on the first call, outside the window
        loss.block_until_ready()
        mngr = CheckpointManager(harness.fresh_dir(ckpt_dir), max_to_keep=2, async_save=True) if save else None
        with harness.Stopwatch() as sw:
            for i in range(2, steps + 1):
                state, loss = step(state, x)
                if mngr is not None and i % EVERY == 0:
                    # The save needs this step's result anyway: wait for it outside the blocking time.
                    jax.block_until_ready(state)
                    with harness.Stopwatch() as call:
                        mngr.save(i, state)
                    blocking.append(call.seconds)
            loss.block_until_ready()
        if mngr is not None:
            mngr.close()
        return (steps - 1) / sw.seconds

    train(True)  # warm-up: Orbax's first save sets up thread pools
    blocking.clear()
    speed = harness.side_by_side({"none": lambda: train(False), "async": lambda: train(True)}, reps)

    # A synchronous save of the same state, and the checksums alone, for comparison.
    state = jax.tree.map(jnp.copy, init_state)
    sync_times, crc_times = [], []
    for i in range(reps + 1):
        mngr = CheckpointManager(harness.fresh_dir(ckpt_dir), async_save=False)
        with harness.Stopwatch() as sw:
            mngr.save(1, state)
        mngr.close()
        with harness.Stopwatch() as crc:
            for leaf in jax.tree.leaves(state):
                state_item.checksums({"leaf": leaf})
        if i:  # the first is a warm-up
            sync_times.append(sw.seconds)
            crc_times.append(crc.seconds)
    shutil.rmtree(ckpt_dir, ignore_errors=True)
    block, sync, crc = statistics.median(blocking), statistics.median(sync_times), statistics.median(crc_times)
    what = f"MLP {depth}x{width}x{width}, {state_bytes / MiB:.0f} MiB state, {steps} steps"
    return [
        Record(NAME, speed["async"], "steps/s", speed["none"],
               f"same training without checkpoints ({what}; async save every {EVERY} steps)",
               speed["async"] / speed["none"], "ratio >= 0.98"),
        Record(NAME + "_blocking", block, "s", sync,
               f"a synchronous save of the same {state_bytes / MiB:.0f} MiB state", sync / block, None),
        Record(NAME + "_checksum", crc, "s", sync,
               f"XXH3 hash of the {state_bytes / MiB:.0f} MiB state vs a synchronous save of it", sync / crc, None),
    ]


if __name__ == "__main__":
    from benchmarks.run import main_for

    main_for(run)
