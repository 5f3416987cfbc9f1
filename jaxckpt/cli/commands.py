"""`python -m jaxckpt inspect|verify|plan|export|zoo ...`: look at checkpoints and plan grafts without training.

    python -m jaxckpt inspect runs/digits                 # steps, metrics, config, param table, integrity
    python -m jaxckpt verify runs/digits                  # every checksum of every step (exit 1: corrupt)
    python -m jaxckpt inspect zoo:digits-mlp --all        # every state leaf, optimizer included
    python -m jaxckpt plan runs/digits --config experiments/configs/digits.py \
        --config.data.target=parity --config.checkpoint.skip=head --config.optimizer.freeze=encoder
    python -m jaxckpt export runs/digits /tmp/digits.safetensors --best   # params, PyTorch names
    python -m jaxckpt export runs/vit --format hf /tmp/vit_hf/   # config.json + model.safetensors
    python -m jaxckpt inspect hf:tests/fixtures/hf/gpt2_lm_head   # an HF folder, as Flax sees it
    python -m jaxckpt zoo publish runs/digits digits-mlp --best
    python -m jaxckpt zoo list

Everything here except `export`, `verify` and the integrity line of `inspect` (which read one step's
arrays; `--no-verify` skips it) reads metadata only: no run or zoo entry is written (except by `zoo publish`); `plan` builds the config's task (which may prepare its dataset)
but only evaluates the shapes of its params. `export` reads the params of one step (never the
optimizer state) and writes them to a safetensors file, or with `--format hf` to an HF folder
(`config.json` from the run's `hf_config` artifact or `--hf-config`, and `model.safetensors`).
`inspect hf:DIR` and `plan hf:DIR` read an HF folder's `config.json` and file headers only. `inspect` and `plan` say which params a
run's `optimizer.freeze` / `optimizer.lr_multipliers` freeze or scale.

A run, checkpoint or step directory may be local or on object storage (`gs://BUCKET/RUN`,
`s3://BUCKET/RUN`) in every command, and `export` may write its `.safetensors` file there; `hf:DIR`
folders, weights files read as sources, `export --format hf` and the zoo stay local (a URL there is
refused in one line saying to copy it). On a URL a step counts once its commit marker is written.

Exit codes: 0 success; 1 `verify`/`inspect` found a corrupt step; 2 a user error (a bad path, an unknown zoo name or config key, a rule
matching nothing, a plan strict mode would refuse), printed as one message on stderr; anything else
is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

import jaxckpt.cli.export as export_command
import jaxckpt.cli.follow as follow_command
import jaxckpt.cli.inspect as inspect_command
import jaxckpt.cli.plan as plan_command
import jaxckpt.cli.verify as verify_command
import jaxckpt.cli.zoo_cli as zoo_command
from jaxckpt.cli.exits import USER_ERROR_EXIT_CODE, describe, quiet_late_loop_callbacks
from jaxckpt.errors import CheckpointCorruptError, is_user_error


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
            prog="jaxckpt", description="Inspect jaxckpt checkpoints, plan grafts, export params, manage the zoo.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    # Each command's module adds its own parser; this order is the order of `--help`.
    inspect_command.add_parser(commands)
    verify_command.add_parser(commands)
    plan_command.add_parser(commands)
    export_command.add_parser(commands)
    zoo_command.add_parser(commands)
    follow_command.add_parser(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Runs `jaxckpt COMMAND ...` and returns its exit code.

    Args:
        argv: the arguments after the program name (default: `sys.argv[1:]`).

    Returns:
        0 on success; 2 for a user error (printed to stderr without a traceback) or bad usage.

    Example:

        main(["inspect", "runs/digits"])
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = _parser()
    try:
        # `plan` hands its unknown arguments (--config, --config.KEY=VALUE) to ml_collections.
        args, extra = parser.parse_known_args(argv)
        if extra and args.command not in ("plan", "follow"):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
    except SystemExit as e:
        return int(e.code or 0)
    from absl import logging as absl_logging

    quiet_late_loop_callbacks()
    # Orbax logs routine notes (e.g. "directory is read only") as warnings; a CLI shows only errors.
    verbosity = absl_logging.get_verbosity()
    absl_logging.set_verbosity(absl_logging.ERROR)
    try:
        if args.command == "plan":
            return plan_command.run_plan(args, ["--config", args.config, *extra])
        if args.command == "follow":
            return follow_command.run(args, extra)
        return args.run(args)
    except Exception as e:
        if not (is_user_error(e) or isinstance(e, CheckpointCorruptError)):
            raise
        sys.stdout.flush()
        print(f"jaxckpt {args.command}: error: {describe(e)}", file=sys.stderr)
        return USER_ERROR_EXIT_CODE
    finally:
        absl_logging.set_verbosity(verbosity)
