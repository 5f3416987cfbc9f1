"""Runs one experiment from a config file; all of the work is in `jaxckpt.loop`.

  python experiments/run.py --config experiments/configs/digits.py --workdir runs/digits \
      [--config.KEY=VALUE ...] [--coordinator_address=HOST:PORT --num_processes=N --process_id=I]

Exit codes: 0 done; 2 a user error (the message says what to fix); 75 stopped by SIGTERM/SIGINT
after saving a checkpoint (rerun the same command to continue); 1 an unexpected failure.
"""

import sys
from pathlib import Path

# Configs name their task module ("experiments.tasks.digits"): make the repository root importable.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

import jaxckpt  # noqa: E402
import jaxckpt.cli  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file (get_config()).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory: checkpoints, logs, metrics, curves.")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None,
                                   "host:port of process 0 for a multi-process run (jax.distributed).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", 1, "Number of processes in a multi-process run.")
_PROCESS_ID = flags.DEFINE_integer("process_id", 0, "This process's index in a multi-process run.")
flags.mark_flags_as_required(["config", "workdir"])


def parse_flags(argv: list[str]) -> list[str]:
    """absl's parsing, but a bad --config or --config.KEY is one line (exit 2), not a traceback."""
    try:
        rest = flags.FLAGS(argv)
        if _CONFIG.value is not None:
            _CONFIG.value.get("task")  # a config file that failed to load raises only when first read
        return rest
    except (flags.Error, AttributeError, KeyError, OSError, SyntaxError) as e:
        hint = " (see --helpfull)" if isinstance(e, flags.Error) else ""
        print(f"jaxckpt: error: {jaxckpt.cli.config_error(e, argv)}{hint}", file=sys.stderr)
        sys.exit(2)


def main(argv: list[str]) -> int:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    if _COORDINATOR.value:
        jaxckpt.distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
    return jaxckpt.run_or_exit(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
