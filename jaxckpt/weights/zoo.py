"""Named, self-contained checkpoints: publish one step of a run under a name, use it as `zoo:NAME`.

A zoo entry is a copy of ONE step directory of a run, with the run's config and a record of where
it came from, laid out like a small run directory so everything that reads runs reads it too:

    <zoo>/<name>/
      zoo.json               name, source run, step, metrics at that step, date, jaxckpt version
      config.json            the run's resolved config
      checkpoints/<step>/    the step directory (state, extras, metrics), copied whole

The zoo folder is `$JAXCKPT_ZOO` if set, else `$XDG_CACHE_HOME/jaxckpt/zoo` (default
`~/.cache/jaxckpt/zoo`). Nothing in an entry points back at the source run: deleting or moving
the run leaves the entry usable offline. Wherever jaxckpt accepts a checkpoint path it also
accepts `"zoo:NAME"`, through `resolve`.

Example:

    publish("runs/digits", "digits-mlp", step="best")
    params, report = load_params(resolve("zoo:digits-mlp"), fresh_params)
"""

from __future__ import annotations

import datetime
import json
import math
import os
import pathlib
import re
import shutil
import tempfile
from typing import Any, Mapping

from jaxckpt.checkpoint.stepdir import EXTRA_ITEM, library_version, read_json_item, read_state_metadata
from jaxckpt.errors import ZooEntryNotFoundError
from jaxckpt.runner.metrics import read_metrics

PREFIX = "zoo:"
ENTRY_FILE = "zoo.json"
_NAME = re.compile(r"[A-Za-z0-9._-]+")
EMA_TREE = "ema_params"  # jaxckpt.train.ema.EMA_KEY; the weights layer does not import the train layer


def zoo_dir() -> pathlib.Path:
    """The zoo folder: `$JAXCKPT_ZOO`, else `$XDG_CACHE_HOME/jaxckpt/zoo`, else `~/.cache/jaxckpt/zoo`.

    Returns:
        The folder (it may not exist yet; `publish` creates it).
    """
    if os.environ.get("JAXCKPT_ZOO"):
        return pathlib.Path(os.environ["JAXCKPT_ZOO"]).expanduser().absolute()
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join("~", ".cache")
    return pathlib.Path(cache, "jaxckpt", "zoo").expanduser().absolute()


def check_name(name: str) -> str:
    """Returns `name` if it is a valid entry name (letters, digits, `.`, `_`, `-`).

    Raises:
        ValueError: naming the bad name and the allowed characters.
    """
    if not isinstance(name, str) or not _NAME.fullmatch(name) or name in (".", ".."):
        raise ValueError(
                f"Zoo name {name!r} is not valid: use letters, digits, '.', '_' and '-' only "
                "(e.g. 'digits-mlp.v1')."
        )
    return name


def best_rule(config: Mapping[str, Any] | None) -> tuple[str | None, str]:
    """The metric and mode that rank a run's "best" step, read from its config dict.

    The loop ranks checkpoints by `early_stop.criteria` (e.g. `"val/loss"`), lower being better
    when `early_stop.minimize` is true.

    Args:
        config: the run's config as a dict (`config.json`), or None.

    Returns:
        `(best_metric, best_mode)`; `best_metric` is None when the config names none.
    """
    early_stop = (config or {}).get("early_stop") or {}
    metric = early_stop.get("criteria") or None
    return metric, ("min" if early_stop.get("minimize", True) else "max")


def read_json(path: pathlib.Path) -> dict[str, Any] | None:
    """A JSON file's contents, None if there is no such file; invalid JSON is a ValueError naming it."""
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e}); fix or remove it.") from e


def _run_config(checkpoint_dir: pathlib.Path, step_dir: pathlib.Path) -> dict[str, Any] | None:
    """The run's config: `config.json` beside `checkpoints/`, else the one saved in `step_dir`."""
    config = read_json(checkpoint_dir.parent / "config.json")
    if config is None:
        config = (read_json_item(step_dir, EXTRA_ITEM) or {}).get("config")
    return config


def _jsonl_metrics(run_dir: pathlib.Path, step: int) -> dict[str, float]:
    """The points logged in `metrics.jsonl` at `step`, as `{"<split>/<metric>": value}`."""
    out = {}
    for point in read_metrics(run_dir / "metrics.jsonl"):
        if point.get("step") == step:
            split = point.get("split", "?")
            out.update({f"{split}/{k}": v for k, v in point.items() if k not in ("step", "split")})
    return out


def _finite_or_none(metrics: Mapping[str, float]) -> dict[str, float | None]:
    return {k: (v if isinstance(v, (int, float)) and math.isfinite(v) else None) for k, v in metrics.items()}


def publish(
    workdir: str | os.PathLike,
    name: str,
    *,
    step: int | str | None = None,
    overwrite: bool = False,
    best_metric: str | None = None,
    best_mode: str | None = None,
    ema: bool = False,
) -> pathlib.Path:
    """Copies one step of a run into the zoo as `<zoo>/<name>/`, self-contained.

    The copy is assembled in a temporary folder inside the zoo and renamed into place, so a
    crash never leaves a half-written entry under `name`.

    Args:
        workdir: a run directory, its `checkpoints/` directory, or one step directory
            (which then fixes the step).
        name: the entry name (`[A-Za-z0-9._-]+`); later used as `zoo:NAME`.
        step: None or `"latest"` (the newest step), `"best"` (ranked by the run's
            `early_stop.criteria`, or `best_metric`), or a step number.
        overwrite: replace an existing entry of the same name.
        best_metric: the metric ranking steps for `step="best"` (default: from the run's config).
        best_mode: `"min"` or `"max"` for `best_metric` (default: from the run's config).
        ema: publish the step's averaged weights (`ema_params`, from `train.ema_decay`): the
            entry records `"weights": "ema_params"`, and `zoo:NAME` as a weights source reads them.

    Returns:
        The entry's step directory (what `resolve("zoo:NAME")` returns).

    Raises:
        ValueError: for an invalid name, `step="best"` when no metric ranks steps, or `ema` for a
            step without averaged weights.
        FileExistsError: if the name is taken and `overwrite` is False.
        CheckpointNotFoundError: if the run has no checkpoint, or not the asked step.

    Example:

        path = publish("runs/digits", "digits-mlp", step="best")
    """
    # pretrained resolves `zoo:` references through this module, so import it here, not at the top.
    from jaxckpt.weights.pretrained import resolve_checkpoint_path, resolve_step_dir

    check_name(name)
    source = resolve(workdir)
    checkpoint_dir, _ = resolve_checkpoint_path(source)
    config = _run_config(checkpoint_dir, resolve_step_dir(source))
    if step == "best":
        metric, mode = best_rule(config)
        best_metric, best_mode = best_metric or metric, best_mode or mode
        if best_metric is None:
            raise ValueError(
                    f"Cannot pick the best step of {checkpoint_dir}: its config names no "
                    "early_stop.criteria. Pass best_metric='<metric>', or publish a step number."
            )
    step_dir = resolve_step_dir(source, step, best_metric=best_metric, best_mode=best_mode or "min")
    chosen = int(step_dir.name)
    if ema and not any(p.startswith(EMA_TREE + "/") for p in read_state_metadata(step_dir)):
        raise ValueError(
                f"--ema: step {chosen} of {checkpoint_dir} holds no averaged weights ({EMA_TREE}); it was "
                "trained with train.ema_decay=0. Publish its params (drop --ema).")
    saved_metrics = read_json_item(step_dir, "metrics") or {}

    root = zoo_dir()
    entry = root / name
    if entry.exists() and not overwrite:
        raise FileExistsError(
                f"Zoo entry {name!r} already exists at {entry}; choose another name or pass overwrite=True "
                "(CLI: --overwrite)."
        )
    root.mkdir(parents=True, exist_ok=True)
    staging = pathlib.Path(tempfile.mkdtemp(dir=root, prefix=f".{name}.", suffix=".tmp"))
    try:
        shutil.copytree(step_dir, staging / "checkpoints" / str(chosen))
        if config is not None:
            (staging / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        metrics = {**_jsonl_metrics(checkpoint_dir.parent, chosen), **saved_metrics}
        record = {
                "name": name,
                "step": chosen,
                "selected": "latest" if step is None else str(step),
                "source": str(checkpoint_dir.parent),
                "metrics": _finite_or_none(metrics),
                "published_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                "jaxckpt_version": library_version(),
                "weights": EMA_TREE if ema else "params",
        }
        (staging / ENTRY_FILE).write_text(json.dumps(record, indent=2) + "\n")
        if entry.exists():
            # Move the old entry aside first so `name` is never missing a valid entry for long.
            old = staging.with_suffix(".old")
            os.rename(entry, old)
            os.rename(staging, entry)
            shutil.rmtree(old)
        else:
            os.rename(staging, entry)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return entry / "checkpoints" / str(chosen)


def _entry_record(entry: pathlib.Path) -> dict[str, Any] | None:
    record = read_json(entry / ENTRY_FILE)
    if record is None:
        return None
    step_dir = entry / "checkpoints" / str(record.get("step"))
    return {**record, "name": entry.name, "path": str(step_dir)}


def list_entries() -> list[dict[str, Any]]:
    """The zoo's entries, sorted by name.

    Returns:
        One dict per entry: the fields of its `zoo.json` (`name`, `step`, `source`, `metrics`,
        `published_at`, `jaxckpt_version`, ...) plus `path`, its step directory. Folders without
        a `zoo.json` (not entries) and unfinished publications are left out.

    Example:

        for entry in list_entries():
            print(entry["name"], entry["step"], entry["metrics"])
    """
    root = zoo_dir()
    if not root.is_dir():
        return []
    entries = []
    for entry in sorted(root.iterdir()):
        if entry.name.startswith(".") or not entry.is_dir():
            continue
        record = _entry_record(entry)
        if record is not None:
            entries.append(record)
    return entries


def published_tree(ref: Any) -> str:
    """Which tree of its step a zoo entry stands for: `"params"`, or `"ema_params"` if published with `ema`."""
    if not is_ref(ref):
        return "params"
    resolve(ref)  # a missing entry is reported by name
    record = read_json(zoo_dir() / check_name(ref[len(PREFIX):]) / ENTRY_FILE) or {}
    return record.get("weights", "params")


def is_ref(ref: Any) -> bool:
    """Whether `ref` is a `"zoo:NAME"` reference."""
    return isinstance(ref, str) and ref.startswith(PREFIX)


def resolve(ref: str | os.PathLike) -> pathlib.Path:
    """Turns `"zoo:NAME"` into the entry's step directory; returns any other path as a `Path`.

    Args:
        ref: `"zoo:NAME"`, or a path (returned unchanged, as a `pathlib.Path`).

    Returns:
        `<zoo>/<name>/checkpoints/<step>` for a zoo reference, else `Path(ref)`.

    Raises:
        ZooEntryNotFoundError: if no entry has that name; the message lists the entries there are.
        ValueError: if the name is not a valid entry name.

    Example:

        step_dir = resolve("zoo:digits-mlp")   # ~/.cache/jaxckpt/zoo/digits-mlp/checkpoints/600
        resolve("runs/digits")                  # Path("runs/digits")
    """
    if not is_ref(ref):
        return pathlib.Path(ref)
    name = check_name(ref[len(PREFIX):])
    record = _entry_record(zoo_dir() / name)
    if record is None:
        names = [e["name"] for e in list_entries()]
        available = ", ".join(names) if names else "none (publish one with `python -m jaxckpt zoo publish`)"
        raise ZooEntryNotFoundError(
                f"{ref!r}: no zoo entry named {name!r} in {zoo_dir()} (set by $JAXCKPT_ZOO). "
                f"Available: {available}."
        )
    step_dir = pathlib.Path(record["path"])
    if not step_dir.is_dir():
        raise ZooEntryNotFoundError(
                f"Zoo entry {name!r} is damaged: its step directory {step_dir} is missing. Publish it "
                "again with overwrite=True."
        )
    return step_dir
