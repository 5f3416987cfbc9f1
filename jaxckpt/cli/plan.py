"""`python -m jaxckpt plan [SOURCE] --config FILE [--config.KEY=VALUE ...]`: a graft, planned on shapes.

Builds the config's task (which may prepare its dataset) but only evaluates the shapes of its
params, and reads the source's metadata or file headers, never its arrays.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any, Sequence

import jaxckpt.cli.tables as cli_tables
from jaxckpt import config_strings
from jaxckpt.cli.config_args import load_config
from jaxckpt.errors import UserError
from jaxckpt.weights import zoo


def _source_metadata(source: str, rename: Any) -> tuple[dict[str, Any], str, tuple[Any, ...]]:
    """The source's leaves as abstract or lazy values (nothing is read), a description, and the
    structural rules the source needs (an HF folder's fused tensors)."""
    from jaxckpt.checkpoint.stepdir import read_state_metadata
    from jaxckpt.weights import hf
    from jaxckpt.weights.foreign import is_foreign, read_foreign
    from jaxckpt.weights.pretrained import PARAMS_KEY, resolve_step_dir

    if hf.is_hf(source):
        opened = hf.open_hf(source)
        described = f"HF folder {opened.folder} ({opened.family}, {', '.join(opened.files)})"
        return opened.leaves, described, opened.structure
    if is_foreign(source):
        return read_foreign(source, rename=rename), f"weights file {source}", ()
    step_dir = resolve_step_dir(zoo.resolve(source))
    saved = read_state_metadata(step_dir)
    # A jaxckpt step holds the whole train state; its params are what pretrained loading grafts.
    prefix = PARAMS_KEY + "/"
    if any(p.startswith(prefix) for p in saved):
        saved = {p[len(prefix):]: v for p, v in saved.items() if p.startswith(prefix)}
    return saved, f"step directory {step_dir}", ()


def run_plan(args: argparse.Namespace, config_args: Sequence[str]) -> int:
    """Prints the graft plan; returns 0 if the graft would succeed.

    Raises:
      UserError: if there is no source, or strict mode would refuse the graft (the problems are named).
    """
    import jax

    # `jaxckpt.graft` the name is the function once the package re-exports it: import from the module.
    from jaxckpt.grafting.graft import plan as plan_graft
    from jaxckpt.runner.task import load_task
    from jaxckpt.weights.foreign import is_foreign

    # Configs name their task module relative to the repository root; `python -m` puts the
    # working directory on sys.path but the `jaxckpt` console script does not.
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    config = load_config(config_args)
    ck = config.checkpoint
    source = args.source or ck.pretrained
    if not source:
        raise UserError("plan needs a SOURCE (run dir, step dir, zoo:NAME, .safetensors, .pt or hf:DIR), "
                        "or --config.checkpoint.pretrained=SOURCE.")
    from jaxckpt.grafting.structure import parse_structure

    options = config_strings.checkpoint_options(ck)
    source_leaves, described, structure = _source_metadata(str(source), options.pop("rename"))
    structure += parse_structure(getattr(ck, "structure", ""))
    task = load_task(config)
    # The same abstract params the loop builds: shapes only, nothing is computed.
    target = jax.eval_shape(task.init_params, jax.random.fold_in(jax.random.PRNGKey(config.seed), 1))
    report = plan_graft(source_leaves, target, structure=structure, **options)
    freeze, multipliers = cli_tables.training_spec(config.get("optimizer"))
    labels = cli_tables.describe_training(target, freeze, multipliers) if freeze or multipliers else {}

    print(f"plan: graft {described}\n      into the params of {config.task}")
    print(f"      mapping={ck.mapping or 'whole tree'} skip={ck.skip or 'none'} "
          f"adapters={ck.adapters or 'none'} strict={ck.strict}")
    print(report.format(every_leaf=True))
    if labels:
        print("\n" + cli_tables.training_table(report, target, labels, freeze, multipliers))
    if report.ok:
        print("\nresult: the graft would succeed.")
        return 0
    if not ck.strict:
        print("\nresult: the graft would succeed with strict=False; the missing, mismatched and unused "
              "leaves above keep their fresh values.")
        return 0
    raise UserError(
            f"strict mode would refuse this graft ({report.counts['missing']} missing, "
            f"{report.counts['mismatched']} mismatched, {report.counts['unused']} unused):\n"
            f"{report.problems()}\nTo proceed, pass --config.checkpoint.strict=False to keep those leaves "
            "fresh, or narrow the graft with --config.checkpoint.mapping='src:dst,...' and "
            "--config.checkpoint.skip='regex,...'."
            + (" A weights file's tensor names map to param paths with "
               "--config.checkpoint.rename='regex=>path;...'." if is_foreign(str(source)) else "")
    )


def add_parser(commands: argparse._SubParsersAction) -> None:
    """Adds the `plan` command to the CLI's subparsers; its other arguments are config overrides."""
    plan = commands.add_parser(
            "plan", help="what pretrained loading would graft into a config's model", allow_abbrev=False,
            description="Prints the graft plan of SOURCE into the model of --config, with "
            "config.checkpoint.mapping/skip/adapters/strict, reading no array. Other arguments are "
            "config overrides: --config.KEY=VALUE.")
    plan.add_argument("source", nargs="?", default=None,
                      help="run dir, step dir, zoo:NAME, .safetensors, .pt or hf:DIR "
                      "(default: checkpoint.pretrained)")
    plan.add_argument("--config", required=True, metavar="FILE",
                      help="experiment config file with get_config(); override fields with --config.KEY=VALUE")
