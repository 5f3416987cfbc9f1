"""`python -m jaxckpt export SOURCE OUT`: one step's params as a safetensors file or an HF folder.

Reads the params of one step (never the optimizer state). The HF folder (`--format hf`) is written
by `jaxckpt.cli.hf_cli`.
"""

from __future__ import annotations

import argparse

import jaxckpt.cli.tables as cli_tables
from jaxckpt.cli.inspect import saved_config
from jaxckpt.errors import UserError
from jaxckpt.runner.rundir import best_rule
from jaxckpt.weights import zoo


def run_export(args: argparse.Namespace) -> int:
    """Writes the step's params to `args.out` and prints what it wrote; returns 0.

    Raises:
      UserError: for an OUT that does not fit `--format`, or `--best` on a run with no rule to rank steps.
    """
    from jaxckpt.checkpoint.stepdir import read_state_metadata
    from jaxckpt.tree.treepath import flatten, unflatten_dict
    from jaxckpt.weights.foreign import SAFETENSORS_SUFFIXES, write_safetensors
    from jaxckpt.weights.pretrained import PARAMS_KEY, load_params, resolve_step_dir
    from jaxckpt.weights.tensor_files import refuse_url

    if args.format == "hf":  # refused before any array is read
        refuse_url(args.out, "--format hf writes an HF folder to a local disk (upload the folder after)",
                   key="OUT")
    if args.format == "hf" and args.out.endswith(SAFETENSORS_SUFFIXES):
        raise UserError(f"--format hf writes a folder (config.json + model.safetensors); OUT={args.out!r} "
                        "names a file. Pass a folder, e.g. runs/export/bert_hf/.")
    if args.format == "safetensors" and not args.out.endswith(SAFETENSORS_SUFFIXES):
        raise UserError(f"OUT={args.out!r} must end in .safetensors (e.g. model.safetensors), or pass "
                        "--format hf to write an HF folder.")
    path = zoo.resolve(args.source)
    best_metric, best_mode = None, "min"
    if args.best:
        _, _, config = saved_config(path)
        best_metric, best_mode = best_rule(config)
        if best_metric is None:
            raise UserError(f"--best: {args.source} has no early_stop.criteria in its config to rank steps; "
                            "pass --step N instead.")
    step_dir = resolve_step_dir(path, "best" if args.best else args.step,
                                best_metric=best_metric, best_mode=best_mode)
    saved = read_state_metadata(step_dir)
    tree = zoo.EMA_TREE if args.ema else zoo.published_tree(args.source)
    prefix = tree + "/" if any(p.startswith(PARAMS_KEY + "/") for p in saved) else ""
    abstract = unflatten_dict({p[len(prefix):]: leaf for p, leaf in saved.items() if p.startswith(prefix)})
    # A strict graft onto the step's own shapes: Orbax reads the params and nothing else.
    params, report = load_params(step_dir, abstract, tree=tree)
    if args.format == "hf":
        from jaxckpt.cli.hf_cli import export_step

        print(export_step(params, step_dir, args.out, args.hf_config, args.source))
        return 0
    names = write_safetensors(params, args.out, layout=args.layout)
    leaves = flatten(params)
    nbytes = sum(leaf.nbytes for leaf in leaves.values())
    what = "averaged params (ema_params)" if report.source_tree == zoo.EMA_TREE else "params"
    print(f"exported the {what} of step {step_dir.name} ({args.source}) to {args.out}: {len(names)} tensors, "
          f"{cli_tables.human_bytes(nbytes)}, {args.layout} layout")
    rows = [[name, param, str(tuple(leaves[param].shape))] for param, name in names.items()]
    print(cli_tables.table(rows, ["tensor", "from param", "param shape"]))
    if "://" in args.out:  # weights files are read from a local disk (`jaxckpt.weights.tensor_files.refuse_url`)
        print("\nto load it into a model, copy it to a local disk and pass --config.checkpoint.pretrained=LOCAL_PATH")
    else:
        print(f"\nload it into a model with --config.checkpoint.pretrained={args.out}")
    return 0


def add_parser(commands: argparse._SubParsersAction) -> None:
    """Adds the `export` command to the CLI's subparsers."""
    export = commands.add_parser(
            "export", help="write one step's params to a .safetensors file (PyTorch names and layout) or, with "
            "--format hf, an HF folder",
            description="Reads only the params of one step (not the optimizer state) and writes them to "
            "OUT. With --layout torch, Dense/Conv kernels are written as PyTorch 'weight's in (out, in) / "
            "OIHW layout; --config.checkpoint.pretrained=OUT reads them back into the same model.")
    export.add_argument("source", help="run dir, checkpoints dir, step dir (local, gs:// or s3://), or zoo:NAME")
    export.add_argument("out", help="the file to write, ending in .safetensors (replaced if it exists; local, "
                        "gs:// or s3://); with --format hf, the local folder to write")
    export.add_argument("--format", choices=("safetensors", "hf"), default="safetensors",
                        help="safetensors: one file (default); hf: a Hugging Face folder, config.json + "
                        "model.safetensors, that transformers' from_pretrained loads")
    export.add_argument("--hf-config", default=None, metavar="FILE",
                        help="--format hf: the model's HF config.json (default: the run's hf_config artifact)")
    export.add_argument("--layout", choices=("torch", "flax"), default="torch",
                        help="torch: PyTorch names and layout (default); flax: names and arrays as they are")
    step = export.add_mutually_exclusive_group()
    step.add_argument("--step", type=int, default=None, help="export this step (default: the latest)")
    step.add_argument("--best", action="store_true", help="export the best step by early_stop.criteria")
    export.add_argument("--ema", action="store_true",
                        help="export the averaged weights (ema_params; runs trained with train.ema_decay)")
    export.set_defaults(run=run_export)
