"""`python -m jaxckpt inspect PATH`: a run's steps, metrics, config and state table, from metadata.

Only the integrity line reads arrays (one step's; `--no-verify` skips it). `inspect hf:DIR` is in
`jaxckpt.cli.hf_cli`.
"""

from __future__ import annotations

import argparse
import os
import typing
from typing import Any

import jaxckpt.cli.tables as cli_tables
import jaxckpt.cli.verify as cli_verify
from jaxckpt.errors import UserError
from jaxckpt.runner.config_diff import flat_config
from jaxckpt.runner.rundir import best_rule
from jaxckpt.weights import zoo

if typing.TYPE_CHECKING:
    from jaxckpt.checkpoint.storage import AnyPath

# Config fields worth a line in `inspect`; absent ones are left out (model.* is shown whole).
_CONFIG_SUMMARY = (
        "task", "run_type", "seed", "data.target", "train.num_steps", "train.batch_size", "optimizer.name",
        "optimizer.learning_rate", "optimizer.schedule", "optimizer.freeze", "optimizer.lr_multipliers",
        "early_stop.criteria", "checkpoint.pretrained", "checkpoint.mapping", "checkpoint.skip",
        "checkpoint.adapters", "checkpoint.rename", "checkpoint.structure",
)


def _parse_step(text: str) -> int | str:
    if text in ("latest", "best"):
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--step must be a step number, 'latest' or 'best'; got {text!r}") from None


def saved_config(path: AnyPath | os.PathLike) -> tuple[AnyPath, int | None, dict[str, Any] | None]:
    """`(checkpoint_dir, named_step, config)`: the run's `config.json`, else the one saved in the step."""
    from jaxckpt.checkpoint.stepdir import EXTRA_ITEM, read_json_item
    from jaxckpt.weights.pretrained import resolve_checkpoint_path, resolve_step_dir

    checkpoint_dir, named_step = resolve_checkpoint_path(path)
    config = zoo.read_json(checkpoint_dir.parent / "config.json")
    if config is None:
        config = (read_json_item(resolve_step_dir(path), EXTRA_ITEM) or {}).get("config")
    return checkpoint_dir, named_step, config


def run_inspect(args: argparse.Namespace) -> int:
    """Prints what `inspect` shows; returns 0, or `CORRUPT_EXIT_CODE` if the step's integrity check fails."""
    from jaxckpt.weights.hf import is_hf

    if is_hf(args.path):
        from jaxckpt.cli.hf_cli import inspect_hf

        print(inspect_hf(args.path))
        return 0
    # Imported per command: `zoo list` should not pay for Orbax and JAX start-up.
    from jaxckpt.checkpoint.manager import CheckpointManager
    from jaxckpt.checkpoint.stepdir import INFO_ITEM, read_json_item, read_state_metadata

    checkpoint_dir, named_step, config = saved_config(zoo.resolve(args.path))
    best_metric, best_mode = best_rule(config)
    from jaxckpt.runner.follow_results import FollowerResults  # a follower's results rank steps as the trainer's do

    split, _, name = (best_metric or "").partition("/")
    manager = CheckpointManager(checkpoint_dir, read_only=True, best_metric=best_metric, best_mode=best_mode,
                                late_metrics=FollowerResults(checkpoint_dir.parent, split) if name else None)
    try:
        steps = manager.all_steps()
        if not steps:
            raise UserError(f"{checkpoint_dir} holds no saved step; nothing to inspect.")
        best = manager.best_step() if best_metric else None
        step = named_step if args.step is None else args.step
        if step in (None, "latest"):
            step = steps[-1]
        elif step == "best":
            step = best
        if step is None:
            raise UserError(f"--step=best: no step in {checkpoint_dir} has a finite {best_metric or 'best metric'} "
                            f"(steps: {steps}); pass --step N.")
        if step not in steps:
            raise UserError(f"Step {step} is not in {checkpoint_dir}; saved steps: {steps}.")
        metrics = {s: manager.metrics(s) for s in steps}
    finally:
        manager.close()

    out = [f"checkpoints: {checkpoint_dir}"]
    entry = zoo.read_json(checkpoint_dir.parent / zoo.ENTRY_FILE)
    if entry:
        out.append(f"zoo entry:   {entry.get('name')} (step {entry.get('step')} of {entry.get('source')}, "
                   f"published {entry.get('published_at')})")
    rule = f" by {best_metric} ({best_mode})" if best_metric else " (no early_stop.criteria in the config)"
    out.append(f"steps:       {', '.join(map(str, steps))}")
    out.append(f"latest:      {steps[-1]}")
    out.append(f"best:        {best if best is not None else '-'}{rule}")

    names = sorted({name for m in metrics.values() for name in m})
    rows = []
    for s in steps:
        saved_at = (read_json_item(checkpoint_dir / str(s), INFO_ITEM) or {}).get("saved_at", "")
        marks = ",".join(m for m, hit in (("latest", s == steps[-1]), ("best", s == best)) if hit)
        rows.append([s, saved_at[:19].replace("T", " ")]
                    + [f"{metrics[s][n]:.4g}" if n in metrics[s] else "-" for n in names] + [marks])
    out += ["", cli_tables.table(rows, ["step", "saved_at", *names, ""], right=range(2, 2 + len(names)))]

    if config:
        flat = flat_config(config)
        keys = [k for k in _CONFIG_SUMMARY if flat.get(k) not in (None, "")]
        keys += sorted(k for k in flat if k.startswith("model."))
        out += ["", "config:"] + [f"  {k} = {flat[k]!r}" for k in keys]

    flat = read_state_metadata(checkpoint_dir / str(step))
    labels, training = cli_tables.saved_training(flat, (config or {}).get("optimizer"))
    out += ["", f"state of step {step} (from metadata; no array is read):"]
    ema = [p for p in flat if p.startswith(zoo.EMA_TREE + "/")]
    out.append(f"averaged weights: {zoo.EMA_TREE} ({len(ema)} arrays; eval.use_ema=True or --ema reads them)" if ema
               else "averaged weights: none (train.ema_decay was 0)")
    out.append(cli_tables.state_table(flat, show_all=args.all, labels=labels))
    if training:
        out += ["", training]
    intact = True
    if not args.no_verify:
        intact, line = cli_verify.integrity(checkpoint_dir / str(step))
        out += ["", f"integrity of step {step}: {line}"]
    print("\n".join(out))
    return 0 if intact else cli_verify.CORRUPT_EXIT_CODE


def add_parser(commands: argparse._SubParsersAction) -> None:
    """Adds the `inspect` command to the CLI's subparsers."""
    inspect = commands.add_parser("inspect", help="steps, metrics, config and param table of a checkpoint")
    inspect.add_argument("path", help="run dir, checkpoints dir, step dir (local, gs:// or s3://), zoo:NAME, "
                         "or hf:DIR")
    inspect.add_argument("--step", type=_parse_step, default=None,
                         help="step whose state table to show: N, latest or best (default: latest)")
    inspect.add_argument("--all", action="store_true", help="list every state leaf, not only params")
    inspect.add_argument("--no-verify", action="store_true",
                         help="skip reading the step's arrays to check their checksums (the integrity line)")
    inspect.set_defaults(run=run_inspect)
