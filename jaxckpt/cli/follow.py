"""`python -m jaxckpt follow WORKDIR`: the follower evaluator's command line (see `jaxckpt.runner.follow`)."""

from __future__ import annotations

import argparse
from typing import Any, Sequence


def add_parser(commands: Any) -> None:
    """Adds the `follow` command to the CLI's subparsers."""
    parser = commands.add_parser(
            "follow", help="evaluate each checkpoint of a training run as it lands, beside it",
            allow_abbrev=False,
            description="Runs beside a training run (without its lock) and evaluates each newly committed "
            "step once, writing eval_<split>_<step>.json and the metrics.jsonl point an in-loop evaluation "
            "would; its results rank the run's best checkpoints. Exits once the run has finished and every "
            "step is evaluated. Other arguments are overrides of each step's saved config: --config.KEY=VALUE.")
    parser.add_argument("workdir", help="the training run's directory, local or gs:// / s3:// (it may not exist yet)")
    parser.add_argument("--split", default="val", help="the split to evaluate (default: val)")
    parser.add_argument("--poll", type=float, default=1.0, help="seconds between looks for new steps (default: 1)")


def run(args: argparse.Namespace, overrides: Sequence[str]) -> int:
    """Follows `args.workdir`, logging to stderr and `WORKDIR/follow.log`; returns the exit code 0.

    A `gs://` / `s3://` workdir gets no `follow.log` (a log file is appended to line by line,
    which objects are not): its log goes to stderr only.
    """
    from jaxckpt.checkpoint.storage import is_url, run_path
    from jaxckpt.runner.follow import follow
    from jaxckpt.runner.logs import setup_logging

    workdir = run_path(args.workdir, key="workdir")  # another scheme is refused before a log folder is made
    setup_logging(str(workdir), write=not is_url(workdir), filename="follow.log")
    follow(workdir, split=args.split, overrides=overrides, poll_seconds=args.poll)
    return 0
