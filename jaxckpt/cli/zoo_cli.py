"""`python -m jaxckpt zoo publish|list`: named, self-contained checkpoints (see `jaxckpt.weights.zoo`)."""

from __future__ import annotations

import argparse

import jaxckpt.cli.tables as cli_tables
from jaxckpt.runner.publish import publish
from jaxckpt.weights import zoo


def run_publish(args: argparse.Namespace) -> int:
    """Copies one step of `args.workdir` into the zoo as `zoo:NAME`; returns 0."""
    step = "best" if args.best else args.step
    path = publish(args.workdir, args.name, step=step, overwrite=args.overwrite, ema=args.ema)
    what = ", its averaged weights" if args.ema else ""
    print(f"published zoo:{args.name} (step {path.name} of {args.workdir}{what}) at {path.parent.parent}")
    return 0


def run_list(args: argparse.Namespace) -> int:
    """Prints the zoo's entries; returns 0."""
    entries = zoo.list_entries()
    if not entries:
        print(f"the zoo at {zoo.zoo_dir()} is empty; add to it with `python -m jaxckpt zoo publish WORKDIR NAME`.")
        return 0
    rows = [[f"zoo:{e['name']}", e.get("step"), str(e.get("published_at", ""))[:10],
             cli_tables.short_metrics(e.get("metrics") or {}), e.get("source", "")] for e in entries]
    print(f"zoo: {zoo.zoo_dir()}")
    print(cli_tables.table(rows, ["name", "step", "published", "metrics", "source"], right=(1,)))
    return 0


def add_parser(commands: argparse._SubParsersAction) -> None:
    """Adds the `zoo` command, with its `publish` and `list` subcommands, to the CLI's subparsers."""
    zoo_parser = commands.add_parser("zoo", help="named, self-contained checkpoints")
    zoo_commands = zoo_parser.add_subparsers(dest="zoo_command", required=True, metavar="ZOO_COMMAND")
    publish_parser = zoo_commands.add_parser("publish", help="copy one step of a run into the zoo")
    publish_parser.add_argument("workdir", help="run dir, checkpoints dir or step dir (or zoo:NAME)")
    publish_parser.add_argument("name", help="entry name: letters, digits, '.', '_', '-'")
    which = publish_parser.add_mutually_exclusive_group()
    which.add_argument("--step", type=int, default=None, help="publish this step (default: the latest)")
    which.add_argument("--best", action="store_true", help="publish the best step by early_stop.criteria")
    publish_parser.add_argument("--overwrite", action="store_true", help="replace an entry of the same name")
    publish_parser.add_argument("--ema", action="store_true",
                                help="publish the averaged weights: zoo:NAME then loads ema_params, not params")
    publish_parser.set_defaults(run=run_publish)
    listing = zoo_commands.add_parser("list", help="list the zoo's entries")
    listing.set_defaults(run=run_list)
