"""Run-directory bookkeeping: atomic JSON files, removing what a failed run left, setting steps aside.

What sits in a run directory besides its checkpoints (DESIGN.md, "The run directory"): `config.json`
and other JSON records written atomically, the bookkeeping a run creates before it has anything to
keep, `superseded/<time>/` for steps a continued run moved aside, and which metric ranks its best step.

A run directory may be local or on `gs://` / `s3://`: `run_file` gives the path to use (a
`pathlib.Path` locally, as before, an `etils.epath.Path` for a URL), and every write here goes
through a local rename or, on an object store, one whole-object upload.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Any, Iterable, Mapping

from jaxckpt.checkpoint import storage
from jaxckpt.runner.logs import log

# What a run writes into its workdir before it has anything to keep: the lock, the log, an empty
# checkpoint directory.
_BOOKKEEPING = (".lock", "train.log", "checkpoints")


def run_file(path: str | os.PathLike) -> storage.AnyPath:
    """A run file's path as code reads and writes it: `epath.Path` for a URL, else `pathlib.Path(path)`.

    Unlike `storage.run_path`, a local path is not made absolute, so messages name it as given.
    """
    return storage.as_path(path) if storage.is_url(path) else Path(path)


def entries(workdir: str | os.PathLike) -> set[str] | None:
    """The names in `workdir` now, or None if it does not exist (see `remove_bookkeeping`).

    On an object store a "directory" exists while objects are under it, so an empty or new one is None.
    """
    path = run_file(workdir)
    return {p.name for p in path.iterdir()} if path.is_dir() else None


def remove_bookkeeping(workdir: str | os.PathLike, before: set[str] | None) -> bool:
    """After a run that failed before writing anything else, removes what it created in `workdir`.

    A config error (a bad `data.target`, an unknown `early_stop.criteria`) found after the lock and
    log are set up must not leave a new workdir holding `.lock`, `train.log` and an empty
    `checkpoints/`. Only those are removed, only if the run created them (they are not in
    `before`), and only if the run created nothing else (a `config.json`, a metric, a checkpoint
    means something happened worth keeping). The workdir goes too if the run created it.

    Args:
      workdir: the run directory; the run's lock must be released already.
      before: `entries(workdir)` from before the run.

    Returns:
      Whether anything was removed.
    """
    path = run_file(workdir)
    if not path.is_dir():
        return False
    new = {p.name for p in path.iterdir()} - (before or set())
    checkpoints = path / "checkpoints"
    if not new or not new <= set(_BOOKKEEPING) or ("checkpoints" in new and any(checkpoints.iterdir())):
        return False
    url = storage.is_url(path)
    log_file = str(path / "train.log") if url else str((path / "train.log").absolute())
    for handler in list(log.handlers):  # the log file is about to go: stop writing to it
        # An `UploadingHandler` names its object in `target` (its `baseFilename` is a local copy).
        if getattr(handler, "target", getattr(handler, "baseFilename", None)) == log_file:
            log.removeHandler(handler)
            handler.close()
    for name in new:
        (path / name).rmdir() if name == "checkpoints" else (path / name).unlink()
    # An object store has no empty directories: the prefix is gone with its last object.
    if before is None and not url and not any(path.iterdir()):
        path.rmdir()
    return True


def write_json(path: str | os.PathLike, data: Any) -> None:
    """Writes JSON atomically: a crash leaves the old file or the new.

    Locally a temporary file, fsync, rename; on an object store one upload.
    """
    text = json.dumps(data, indent=2, sort_keys=True, default=str) + "\n"
    if storage.is_url(path):
        storage.write_bytes_atomic(path, text.encode())
        return
    path = Path(path)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def set_aside(checkpoint_dir: Path, steps: Iterable[int], workdir: Path) -> Path | None:
    """Moves step directories to `WORKDIR/superseded/<time>/` (never deletes them).

    Used when training continues from an older (best) step: the newer steps would otherwise be
    overwritten or confuse "latest". An object store has no rename: each step's objects are
    copied, then the step is deleted, so a crash in between leaves a copy, never a loss.

    Returns:
      The folder they were moved to, or None if there was nothing to move.
    """
    steps = sorted(steps)
    if not steps:
        return None
    dest = run_file(workdir) / "superseded" / time.strftime("%Y%m%d-%H%M%S")
    if storage.is_url(dest):
        for step in steps:
            source = run_file(checkpoint_dir) / str(step)
            for path in storage.files_under(source):
                storage.write_bytes_atomic(dest / str(step) / path.relative_to(source), path.read_bytes())
            source.rmtree()
        return dest
    dest.mkdir(parents=True, exist_ok=True)
    for step in steps:
        shutil.move(str(checkpoint_dir / str(step)), str(dest / str(step)))
    return dest


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
