"""Named, self-contained checkpoints: the zoo folder, its entries, and `zoo:NAME` references.

A zoo entry is a copy of ONE step directory of a run, with the run's config and a record of where
it came from, laid out like a small run directory so everything that reads runs reads it too:

    <zoo>/<name>/
      zoo.json               name, source run, step, metrics at that step, date, jaxckpt version
      config.json            the run's resolved config
      checkpoints/<step>/    the step directory (state, extras, metrics), copied whole

The zoo folder is `$JAXCKPT_ZOO` if set, else `$XDG_CACHE_HOME/jaxckpt/zoo` (default
`~/.cache/jaxckpt/zoo`). Nothing in an entry points back at the source run: deleting or moving
the run leaves the entry usable offline. Wherever jaxckpt accepts a checkpoint path it also
accepts `"zoo:NAME"`, through `resolve`. Entries are made by `jaxckpt.runner.publish.publish`
(`python -m jaxckpt zoo publish`), which reads a run directory, so it sits in the runner layer.

Example:

    params, report = load_params(resolve("zoo:digits-mlp"), fresh_params)
"""

from __future__ import annotations

import json
import os
import pathlib
import re
from typing import Any

from jaxckpt.checkpoint import storage
from jaxckpt.errors import UserError, ZooEntryNotFoundError

PREFIX = "zoo:"
ENTRY_FILE = "zoo.json"
_NAME = re.compile(r"[A-Za-z0-9._-]+")
EMA_TREE = "ema_params"  # jaxckpt.train.ema.EMA_KEY; the weights layer does not import the train layer


def zoo_dir() -> pathlib.Path:
    """The zoo folder: `$JAXCKPT_ZOO`, else `$XDG_CACHE_HOME/jaxckpt/zoo`, else `~/.cache/jaxckpt/zoo`.

    The zoo is a local folder: publishing assembles an entry beside the others and renames it
    into place, which an object store cannot do. Runs and checkpoints may be URLs; publish from
    one into the local zoo (`python -m jaxckpt zoo publish gs://bucket/run NAME`).

    Returns:
        The folder (it may not exist yet; publishing creates it).

    Raises:
        UserError: if `$JAXCKPT_ZOO` is a URL.
    """
    if os.environ.get("JAXCKPT_ZOO"):
        value = os.environ["JAXCKPT_ZOO"]
        if "://" in value:
            raise UserError(
                    f"JAXCKPT_ZOO={value} is a URL, but the zoo is a local folder (an entry is published by "
                    "a rename, which object stores lack). Set JAXCKPT_ZOO to a local folder; runs and "
                    "checkpoints themselves may stay on gs:// or s3:// and be published from there.")
        return storage.local_path(value, key="JAXCKPT_ZOO")
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join("~", ".cache")
    return storage.local_path(os.path.join(cache, "jaxckpt", "zoo"))


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


def read_json(path: storage.AnyPath) -> dict[str, Any] | None:
    """A JSON file's contents, None if there is no such file; invalid JSON is a ValueError naming it."""
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e}); fix or remove it.") from e


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


def resolve(ref: str | os.PathLike) -> storage.AnyPath:
    """Turns `"zoo:NAME"` into the entry's step directory; returns any other path as `storage.run_path` does.

    Args:
        ref: `"zoo:NAME"`, a local path (returned absolute and normalised) or a `gs://` / `s3://`
            URL (returned as an `epath.Path`).

    Returns:
        `<zoo>/<name>/checkpoints/<step>` for a zoo reference, else `storage.run_path(ref)`.

    Raises:
        ZooEntryNotFoundError: if no entry has that name; the message lists the entries there are.
        ValueError: if the name is not a valid entry name.
        UserError: if `ref` is a URL of another scheme, or `$JAXCKPT_ZOO` is a URL.

    Example:

        step_dir = resolve("zoo:digits-mlp")   # ~/.cache/jaxckpt/zoo/digits-mlp/checkpoints/600
        resolve("runs/digits")                  # Path("/abs/runs/digits")
        resolve("gs://bucket/runs/digits")      # epath.Path("gs://bucket/runs/digits")
    """
    if not is_ref(ref):
        return storage.run_path(ref)
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
