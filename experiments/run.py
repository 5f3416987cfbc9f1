"""Runs one experiment from a config file; all of the work is in `jaxckpt.loop`.

  python experiments/run.py --config experiments/configs/digits.py --workdir runs/digits \
      [--config.KEY=VALUE ...] [--coordinator_address=HOST:PORT --num_processes=N --process_id=I]

Exit codes: 0 done; 2 a user error (the message says what to fix); 75 stopped by SIGTERM/SIGINT
after saving a checkpoint (rerun the same command to continue); 1 an unexpected failure.
"""

import ast
import sys
from pathlib import Path

# Configs name their task module ("experiments.tasks.digits"): make the repository root importable.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

import jaxckpt  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file (get_config()).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory: checkpoints, logs, metrics, curves.")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None,
                                   "host:port of process 0 for a multi-process run (jax.distributed).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", 1, "Number of processes in a multi-process run.")
_PROCESS_ID = flags.DEFINE_integer("process_id", 0, "This process's index in a multi-process run.")
flags.mark_flags_as_required(["config", "workdir"])


def parse_flags(argv: list[str]) -> list[str]:
    """absl's parsing, but a misspelt --config.KEY is one line (exit 2), not ml_collections' traceback."""
    try:
        return flags.FLAGS(argv)
    except (flags.Error, AttributeError, KeyError) as e:
        message = str(e.args[0] if e.args else e)
        if isinstance(e, (AttributeError, KeyError)) and message[:1] in "'\"":
            message = "unknown config key " + ast.literal_eval(message)  # ml_collections quotes a KeyError
        message = " ".join(message.split())
        print(f"jaxckpt: error: bad command line: {message} (see --helpfull)", file=sys.stderr)
        sys.exit(2)


def main(argv: list[str]) -> int:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    if _COORDINATOR.value:
        jaxckpt.distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
    return jaxckpt.run_or_exit(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
