"""What does the config-driven loop cost per step, next to a hand-written `jax.jit` loop?

Same task (digits: `experiments.tasks.digits.build`), model, batch size, optimizer (Adam, the
config's learning rate), grain data iterator and dropout randomness. The jaxckpt side is
`jaxckpt.runner.loop.run` with `run_type="train"` (no validation) and one checkpoint at the end; the
hand-written side jits `value_and_grad` + `optax` and reads the loss every `log_every_steps`,
as a minimal loop would. Both are timed from the end of the first logging window (compilation
and start-up excluded) to the last step, so the figure is steady-state steps/s.

  python -m benchmarks.loop_overhead [--quick | --smoke]
"""

from __future__ import annotations

import contextlib
import io
import logging
import pathlib
import re
import shutil
import time

import jax
import jax.numpy as jnp
import optax

from benchmarks import harness
from benchmarks.harness import Record

NAME = "loop_overhead"
_STEP_LINE = re.compile(r"step (\d+)/\d+")


def config_for(num_steps: int, data_dir: str = ""):
    """The digits config, training only, logging every 20 steps, saving only at the end."""
    from experiments.configs import digits

    config = digits.get_config()
    config.run_type = "train"
    config.train.num_steps = num_steps
    config.checkpoint.every_steps = num_steps
    config.data.data_dir = data_dir
    return config


class _StepTimes(logging.Filter):
    """Notes when each "step N/M" log line is emitted (a logger filter survives handler resets)."""

    def __init__(self):
        super().__init__()
        self.times: dict[int, float] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        match = _STEP_LINE.match(record.getMessage())
        if match:
            self.times[int(match.group(1))] = time.perf_counter()
        return True


def jaxckpt_steps_per_second(config, workdir: pathlib.Path) -> float:
    """Steady-state steps/s of `jaxckpt.runner.loop.run`, from the first logged window to the last step."""
    from jaxckpt.runner import loop
    from jaxckpt.runner.logs import log

    times = _StepTimes()
    log.addFilter(times)
    shutil.rmtree(workdir, ignore_errors=True)
    try:
        # A non-terminal stderr turns tqdm off and the per-window log lines on; the log is noise here.
        with contextlib.redirect_stderr(io.StringIO()):
            loop.run(config, workdir)
    finally:
        log.removeFilter(times)
        shutil.rmtree(workdir, ignore_errors=True)
    first, last = config.train.log_every_steps, config.train.num_steps
    return (last - first) / (times.times[last] - times.times[first])


def handwritten_steps_per_second(config) -> float:
    """Steady-state steps/s of a minimal jit loop on the same task, data and optimizer."""
    from experiments.tasks import digits

    task = digits.build(config)
    tx = optax.adam(config.optimizer.learning_rate)
    rng = jax.random.PRNGKey(config.seed)
    params = task.init_params(jax.random.fold_in(rng, 1))
    opt_state = tx.init(params)

    def step(params, opt_state, i, batch):
        rng_i = jax.random.fold_in(rng, i)
        (loss, _), grads = jax.value_and_grad(task.loss_fn, has_aux=True)(params, batch, rng_i)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, i + 1, loss

    step = jax.jit(step, donate_argnums=(0, 1, 2))
    data = task.train_iterator(config.train.batch_size, config.seed)
    i = jnp.zeros((), jnp.int32)
    first, last = config.train.log_every_steps, config.train.num_steps
    start = None
    for n in range(1, last + 1):
        params, opt_state, i, loss = step(params, opt_state, i, jax.device_put(next(data)))
        if n % config.train.log_every_steps == 0 or n == last:
            float(loss)
            if n == first:
                start = time.perf_counter()
    return (last - first) / (time.perf_counter() - start)


def run(mode: str, workdir: pathlib.Path) -> list[Record]:
    steps = harness.rounds(mode, 120, 500, 2000)
    reps = harness.rounds(mode, 1, 3, 5)
    config = config_for(steps)
    run_dir = workdir / NAME
    handwritten_steps_per_second(config_for(40))  # prepares the dataset; warms the caches
    got = harness.side_by_side({
        "jaxckpt": lambda: jaxckpt_steps_per_second(config, run_dir),
        "handwritten": lambda: handwritten_steps_per_second(config),
    }, reps)
    return [Record(NAME, got["jaxckpt"], "steps/s", got["handwritten"],
                   f"hand-written jax.jit + optax loop, digits, batch {config.train.batch_size}, {steps} steps",
                   got["jaxckpt"] / got["handwritten"], "ratio >= 0.97")]


if __name__ == "__main__":
    from benchmarks.run import main_for

    main_for(run)
