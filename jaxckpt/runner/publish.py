"""Publishing one step of a run into the zoo, as a self-contained entry usable as `zoo:NAME`.

It reads the run directory (its config, `metrics.jsonl`, the chosen step), which is the runner's
layout, so it lives here rather than in `jaxckpt.weights.zoo`, which only finds and lists entries
(see that module for an entry's layout).

Example:

    publish("runs/digits", "digits-mlp", step="best")
"""

from __future__ import annotations

import datetime
import json
import math
import os
import pathlib
import shutil
import tempfile
from typing import Any, Mapping

from jaxckpt.checkpoint import storage
from jaxckpt.checkpoint.formats import library_version
from jaxckpt.checkpoint.stepdir import EXTRA_ITEM, read_json_item, read_state_metadata
from jaxckpt.runner.metrics_jsonl import read_metrics
from jaxckpt.runner.rundir import best_rule
from jaxckpt.weights import zoo
from jaxckpt.weights.pretrained import resolve_checkpoint_path, resolve_step_dir


def _run_config(checkpoint_dir: storage.AnyPath, step_dir: storage.AnyPath) -> dict[str, Any] | None:
    """The run's config: `config.json` beside `checkpoints/`, else the one saved in `step_dir`."""
    config = zoo.read_json(checkpoint_dir.parent / "config.json")
    if config is None:
        config = (read_json_item(step_dir, EXTRA_ITEM) or {}).get("config")
    return config


def _jsonl_metrics(run_dir: storage.AnyPath, step: int) -> dict[str, float]:
    """The points logged in `metrics.jsonl` at `step`, as `{"<split>/<metric>": value}`."""
    path = run_dir / "metrics.jsonl"
    out = {}
    for point in read_metrics(path):
        if point.get("step") == step:
            split = point.get("split", "?")
            out.update({f"{split}/{k}": v for k, v in point.items() if k not in ("step", "split")})
    return out


def _copy_tree(source: storage.AnyPath, dest: pathlib.Path) -> None:
    """Copies a directory tree, local or on `gs://`/`s3://`, to a new local folder `dest`."""
    if not storage.is_url(source):
        shutil.copytree(source, dest)
        return
    dest.mkdir(parents=True)
    for file in storage.files_under(source):  # one listing: an object store's "folders" are key prefixes
        target = dest / str(file)[len(str(source)) + 1:]
        target.parent.mkdir(parents=True, exist_ok=True)
        with file.open("rb") as src, open(target, "wb") as out:  # streamed: data files may outgrow memory
            shutil.copyfileobj(src, out, 1 << 24)


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
            (which then fixes the step); local or a `gs://` / `s3://` URL (the zoo itself is
            local: `jaxckpt.weights.zoo.zoo_dir`).
        name: the entry name (`[A-Za-z0-9._-]+`); later used as `zoo:NAME`.
        step: None or `"latest"` (the newest step), `"best"` (ranked by the run's
            `early_stop.criteria`, or `best_metric`), or a step number.
        overwrite: replace an existing entry of the same name.
        best_metric: the metric ranking steps for `step="best"` (default: from the run's config).
        best_mode: `"min"` or `"max"` for `best_metric` (default: from the run's config).
        ema: publish the step's averaged weights (`ema_params`, from `train.ema_decay`): the
            entry records `"weights": "ema_params"`, and `zoo:NAME` as a weights source reads them.

    Returns:
        The entry's step directory (what `zoo.resolve("zoo:NAME")` returns).

    Raises:
        ValueError: for an invalid name, `step="best"` when no metric ranks steps, or `ema` for a
            step without averaged weights.
        FileExistsError: if the name is taken and `overwrite` is False.
        CheckpointNotFoundError: if the run has no checkpoint, or not the asked step.

    Example:

        path = publish("runs/digits", "digits-mlp", step="best")
    """
    zoo.check_name(name)
    source = zoo.resolve(workdir)
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
    if ema and not any(p.startswith(zoo.EMA_TREE + "/") for p in read_state_metadata(step_dir)):
        raise ValueError(
                f"--ema: step {chosen} of {checkpoint_dir} holds no averaged weights ({zoo.EMA_TREE}); it was "
                "trained with train.ema_decay=0. Publish its params (drop --ema).")
    saved_metrics = read_json_item(step_dir, "metrics") or {}

    root = zoo.zoo_dir()
    entry = root / name
    if entry.exists() and not overwrite:
        raise FileExistsError(
                f"Zoo entry {name!r} already exists at {entry}; choose another name or pass overwrite=True "
                "(CLI: --overwrite)."
        )
    root.mkdir(parents=True, exist_ok=True)
    staging = pathlib.Path(tempfile.mkdtemp(dir=root, prefix=f".{name}.", suffix=".tmp"))
    try:
        storage.give_default_mode(staging)  # (mkdtemp's 0700 would make the entry private)
        _copy_tree(step_dir, staging / "checkpoints" / str(chosen))
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
                "weights": zoo.EMA_TREE if ema else "params",
        }
        (staging / zoo.ENTRY_FILE).write_text(json.dumps(record, indent=2) + "\n")
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
