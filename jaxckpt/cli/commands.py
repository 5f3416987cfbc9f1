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

Exit codes: 0 success; 1 `verify`/`inspect` found a corrupt step; 2 a user error (a bad path, an unknown zoo name or config key, a rule
matching nothing, a plan strict mode would refuse), printed as one message on stderr; anything else
is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import re
import sys
from typing import Any, Sequence

from jaxckpt import config_strings
from jaxckpt.cli import tables as cli_tables
from jaxckpt.cli import verify as cli_verify
from jaxckpt.cli.exits import USER_ERROR_EXIT_CODE, describe, quiet_late_loop_callbacks
from jaxckpt.errors import CheckpointCorruptError, UserError, is_user_error
from jaxckpt.runner.config_diff import flat_config
from jaxckpt.runner.publish import publish
from jaxckpt.runner.rundir import best_rule
from jaxckpt.weights import zoo

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


def _saved_config(path: pathlib.Path) -> tuple[pathlib.Path, int | None, dict[str, Any] | None]:
    """`(checkpoint_dir, named_step, config)`: the run's `config.json`, else the one saved in the step."""
    from jaxckpt.checkpoint.stepdir import EXTRA_ITEM, read_json_item
    from jaxckpt.weights.pretrained import resolve_checkpoint_path, resolve_step_dir

    checkpoint_dir, named_step = resolve_checkpoint_path(path)
    config = zoo.read_json(checkpoint_dir.parent / "config.json")
    if config is None:
        config = (read_json_item(resolve_step_dir(path), EXTRA_ITEM) or {}).get("config")
    return checkpoint_dir, named_step, config


# inspect


def _inspect(args: argparse.Namespace) -> int:
    from jaxckpt.weights.hf import is_hf

    if is_hf(args.path):
        from jaxckpt.cli.hf_cli import inspect_hf

        print(inspect_hf(args.path))
        return 0
    # Imported per command: `zoo list` should not pay for Orbax and JAX start-up.
    from jaxckpt.checkpoint.manager import CheckpointManager
    from jaxckpt.checkpoint.stepdir import INFO_ITEM, read_json_item, read_state_metadata

    checkpoint_dir, named_step, config = _saved_config(zoo.resolve(args.path))
    best_metric, best_mode = best_rule(config)
    manager = CheckpointManager(checkpoint_dir, read_only=True, best_metric=best_metric, best_mode=best_mode)
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
    out.append(cli_tables.state_table(flat, show_all=args.all, labels=labels))
    if training:
        out += ["", training]
    intact = True
    if not args.no_verify:
        intact, line = cli_verify.integrity(checkpoint_dir / str(step))
        out += ["", f"integrity of step {step}: {line}"]
    print("\n".join(out))
    return 0 if intact else cli_verify.CORRUPT_EXIT_CODE


# plan


def _config_path(argv: Sequence[str]) -> str | None:
    """The config file named by the last `--config FILE` / `--config=FILE` in `argv` (as absl takes it)."""
    path = None
    for i, arg in enumerate(argv):
        if arg == "--config" and i + 1 < len(argv):
            path = argv[i + 1]
        elif arg.startswith("--config="):
            path = arg[len("--config="):]
    return path.split(":", 1)[0] if path else None


def config_error(error: BaseException, argv: Sequence[str]) -> str:
    """One line saying what is wrong with `--config FILE [--config.KEY=VALUE ...]`, for a user.

    ml_collections reports an override of a section the locked config lacks (`--config.trian.x=1`)
    as a KeyError, and of a field it lacks (`--config.train.nmu_steps=1`) as an AttributeError
    wrapping one; both quote the key, on a line of their own, and may add 'Did you mean "train"
    instead of "trian"?'. A config file that cannot be loaded surfaces as an OSError when the
    config is first read. Anything else (a value absl cannot parse) is absl's message on one line.

    Args:
      error: what parsing the flags, or first reading the config, raised.
      argv: the command line, to name the override or the config file at fault.

    Returns:
      The message, e.g. `unknown config key 'trian' in --config.trian.num_steps=3 (did you mean
      'train'?). The config is locked: override only fields its get_config() defines.`
    """
    inner = error
    while inner.args and isinstance(inner.args[0], BaseException):
        inner = inner.args[0]
    raw = str(inner.args[0]) if inner.args else str(inner)
    if isinstance(inner, (KeyError, AttributeError)):
        quoted = re.match(r"""\s*['"]([^'"]+)['"]""", raw)
        key = quoted[1] if quoted else raw.split("\n", 1)[0]
        overrides = [a for a in argv if a.startswith("--config.") and key in a.split("=", 1)[0].split(".")]
        suggestion = re.search(r'Did you mean "([^"]+)"', raw)
        hint = f" (did you mean {suggestion[1]!r}?)" if suggestion else ""
        where = f" in {overrides[0]}" if overrides else ""
        return (f"unknown config key {key!r}{where}{hint}. The config is locked: override only fields its "
                "get_config() defines.")
    if isinstance(inner, OSError):
        path = _config_path(argv)
        if path and not os.path.isfile(path):
            return (f"config file {path!r} does not exist; pass --config PATH/TO/CONFIG.py "
                    "(e.g. experiments/configs/digits.py).")
        reason = [line.strip() for line in raw.splitlines() if line.strip()][-1:] or [raw]
        return f"cannot load the config file {path!r}: {reason[0]}"
    if isinstance(inner, SyntaxError):
        return f"cannot load the config file {_config_path(argv)!r}: SyntaxError: {inner}"
    lines = [line.strip() for line in raw.splitlines() if line.strip()]
    if any(line.startswith("Traceback (most recent call last)") for line in lines):
        # absl embeds the traceback of an error raised by get_config(); its last line says what.
        return f"{lines[0]} {lines[-1]}"
    return " ".join(lines)


def _load_config(config_args: Sequence[str]) -> Any:
    """Parses `--config FILE [--config.KEY=VALUE ...]` with ml_collections, locked like the loop's."""
    from absl import flags
    from ml_collections import config_flags

    argv = ["jaxckpt plan", *config_args]
    flag_values = flags.FlagValues()
    holder = config_flags.DEFINE_config_file("config", None, "Experiment config file (get_config()).",
                                             flag_values=flag_values, lock_config=True, sys_argv=argv)
    try:
        rest = flag_values(argv)
        config = holder.value
        if config is not None:
            config.get("task")  # a config file that failed to load raises only when first read
    except (flags.Error, KeyError, AttributeError, OSError, SyntaxError) as e:
        prefix = "bad config flag: " if isinstance(e, flags.Error) else ""
        raise UserError(prefix + config_error(e, argv)) from None
    if len(rest) > 1:
        raise UserError(f"unexpected arguments: {' '.join(rest[1:])}")
    if config is None:
        raise UserError("plan needs --config FILE (an experiment config with get_config()).")
    return config


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


def _plan(args: argparse.Namespace, config_args: Sequence[str]) -> int:
    import jax

    # `jaxckpt.graft` the name is the function once the package re-exports it: import from the module.
    from jaxckpt.grafting.graft import plan as plan_graft
    from jaxckpt.runner.task import load_task
    from jaxckpt.weights.foreign import is_foreign

    # Configs name their task module relative to the repository root; `python -m` puts the
    # working directory on sys.path but the `jaxckpt` console script does not.
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    config = _load_config(config_args)
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


# export


def _export(args: argparse.Namespace) -> int:
    from jaxckpt.checkpoint.stepdir import read_state_metadata
    from jaxckpt.tree.treepath import flatten, unflatten_dict
    from jaxckpt.weights.foreign import SAFETENSORS_SUFFIXES, write_safetensors
    from jaxckpt.weights.pretrained import PARAMS_KEY, load_params, resolve_step_dir

    if args.format == "hf" and args.out.endswith(SAFETENSORS_SUFFIXES):
        raise UserError(f"--format hf writes a folder (config.json + model.safetensors); OUT={args.out!r} "
                        "names a file. Pass a folder, e.g. runs/export/bert_hf/.")
    if args.format == "safetensors" and not args.out.endswith(SAFETENSORS_SUFFIXES):
        raise UserError(f"OUT={args.out!r} must end in .safetensors (e.g. model.safetensors), or pass "
                        "--format hf to write an HF folder.")
    path = zoo.resolve(args.source)
    best_metric, best_mode = None, "min"
    if args.best:
        _, _, config = _saved_config(path)
        best_metric, best_mode = best_rule(config)
        if best_metric is None:
            raise UserError(f"--best: {args.source} has no early_stop.criteria in its config to rank steps; "
                            "pass --step N instead.")
    step_dir = resolve_step_dir(path, "best" if args.best else args.step,
                                best_metric=best_metric, best_mode=best_mode)
    saved = read_state_metadata(step_dir)
    prefix = PARAMS_KEY + "/" if any(p.startswith(PARAMS_KEY + "/") for p in saved) else ""
    abstract = unflatten_dict({p[len(prefix):]: leaf for p, leaf in saved.items() if p.startswith(prefix)})
    # A strict graft onto the step's own shapes: Orbax reads the params and nothing else.
    params, _ = load_params(step_dir, abstract)
    if args.format == "hf":
        from jaxckpt.cli.hf_cli import export_step

        print(export_step(params, step_dir, args.out, args.hf_config, args.source))
        return 0
    names = write_safetensors(params, args.out, layout=args.layout)
    leaves = flatten(params)
    nbytes = sum(leaf.nbytes for leaf in leaves.values())
    print(f"exported the params of step {step_dir.name} ({args.source}) to {args.out}: {len(names)} tensors, "
          f"{cli_tables.human_bytes(nbytes)}, {args.layout} layout")
    rows = [[name, param, str(tuple(leaves[param].shape))] for param, name in names.items()]
    print(cli_tables.table(rows, ["tensor", "from param", "param shape"]))
    print(f"\nload it into a model with --config.checkpoint.pretrained={args.out}")
    return 0


# zoo


def _zoo_publish(args: argparse.Namespace) -> int:
    step = "best" if args.best else args.step
    path = publish(args.workdir, args.name, step=step, overwrite=args.overwrite)
    print(f"published zoo:{args.name} (step {path.name} of {args.workdir}) at {path.parent.parent}")
    return 0


def _zoo_list(args: argparse.Namespace) -> int:
    entries = zoo.list_entries()
    if not entries:
        print(f"the zoo at {zoo.zoo_dir()} is empty; add to it with `python -m jaxckpt zoo publish WORKDIR NAME`.")
        return 0
    rows = [[f"zoo:{e['name']}", e.get("step"), str(e.get("published_at", ""))[:10],
             cli_tables.short_metrics(e.get("metrics") or {}), e.get("source", "")] for e in entries]
    print(f"zoo: {zoo.zoo_dir()}")
    print(cli_tables.table(rows, ["name", "step", "published", "metrics", "source"], right=(1,)))
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
            prog="jaxckpt", description="Inspect jaxckpt checkpoints, plan grafts, export params, manage the zoo.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    inspect = commands.add_parser("inspect", help="steps, metrics, config and param table of a checkpoint")
    inspect.add_argument("path", help="run dir, checkpoints dir, step dir, zoo:NAME, or hf:DIR")
    inspect.add_argument("--step", type=_parse_step, default=None,
                         help="step whose state table to show: N, latest or best (default: latest)")
    inspect.add_argument("--all", action="store_true", help="list every state leaf, not only params")
    inspect.add_argument("--no-verify", action="store_true",
                         help="skip reading the step's arrays to check their checksums (the integrity line)")
    inspect.set_defaults(run=_inspect)
    cli_verify.add_parser(commands)

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

    export = commands.add_parser(
            "export", help="write one step's params to a .safetensors file (PyTorch names and layout) or, with "
            "--format hf, an HF folder",
            description="Reads only the params of one step (not the optimizer state) and writes them to "
            "OUT. With --layout torch, Dense/Conv kernels are written as PyTorch 'weight's in (out, in) / "
            "OIHW layout; --config.checkpoint.pretrained=OUT reads them back into the same model.")
    export.add_argument("source", help="run dir, checkpoints dir, step dir, or zoo:NAME")
    export.add_argument("out", help="the file to write, ending in .safetensors (replaced if it exists); "
                        "with --format hf, the folder to write")
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
    export.set_defaults(run=_export)

    zoo_parser = commands.add_parser("zoo", help="named, self-contained checkpoints")
    zoo_commands = zoo_parser.add_subparsers(dest="zoo_command", required=True, metavar="ZOO_COMMAND")
    publish = zoo_commands.add_parser("publish", help="copy one step of a run into the zoo")
    publish.add_argument("workdir", help="run dir, checkpoints dir or step dir (or zoo:NAME)")
    publish.add_argument("name", help="entry name: letters, digits, '.', '_', '-'")
    which = publish.add_mutually_exclusive_group()
    which.add_argument("--step", type=int, default=None, help="publish this step (default: the latest)")
    which.add_argument("--best", action="store_true", help="publish the best step by early_stop.criteria")
    publish.add_argument("--overwrite", action="store_true", help="replace an entry of the same name")
    publish.set_defaults(run=_zoo_publish)
    listing = zoo_commands.add_parser("list", help="list the zoo's entries")
    listing.set_defaults(run=_zoo_list)
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
        if extra and args.command != "plan":
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
            return _plan(args, ["--config", args.config, *extra])
        return args.run(args)
    except Exception as e:
        if not (is_user_error(e) or isinstance(e, CheckpointCorruptError)):
            raise
        sys.stdout.flush()
        print(f"jaxckpt {args.command}: error: {describe(e)}", file=sys.stderr)
        return USER_ERROR_EXIT_CODE
    finally:
        absl_logging.set_verbosity(verbosity)
