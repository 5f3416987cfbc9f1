"""Run-directory bookkeeping: atomic JSON files, removing what a failed run left, setting steps aside.

What sits in a run directory besides its checkpoints (DESIGN.md, "The run directory"): `config.json`
and other JSON records written atomically, the bookkeeping a run creates before it has anything to
keep, `superseded/<time>/` for steps a continued run moved aside, and which metric ranks its best step.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any, Iterable, Mapping

from jaxckpt.runner.logs import log

# What a run writes into its workdir before it has anything to keep: the lock, the log, an empty
# checkpoint directory.
_BOOKKEEPING = (".lock", "train.log", "checkpoints")


def entries(workdir: str | os.PathLike) -> set[str] | None:
    """The names in `workdir` now, or None if it does not exist (see `remove_bookkeeping`)."""
    path = Path(workdir)
    return set(os.listdir(path)) if path.is_dir() else None


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
    path = Path(workdir)
    if not path.is_dir():
        return False
    new = set(os.listdir(path)) - (before or set())
    checkpoints = path / "checkpoints"
    if not new or not new <= set(_BOOKKEEPING) or ("checkpoints" in new and any(checkpoints.iterdir())):
        return False
    log_file = str((path / "train.log").absolute())
    for handler in list(log.handlers):  # the log file is about to go: stop writing to it
        if isinstance(handler, logging.FileHandler) and handler.baseFilename == log_file:
            log.removeHandler(handler)
            handler.close()
    for name in new:
        (path / name).rmdir() if name == "checkpoints" else (path / name).unlink()
    if before is None and not any(path.iterdir()):
        path.rmdir()
    return True


def write_json(path: str | os.PathLike, data: Any) -> None:
    """Writes JSON atomically (temporary file, fsync, rename): a crash leaves the old file or the new."""
    path = Path(path)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    with open(tmp, "w") as f:
        json.dump(data, f, indent=2, sort_keys=True, default=str)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def set_aside(checkpoint_dir: Path, steps: Iterable[int], workdir: Path) -> Path | None:
    """Moves step directories to `WORKDIR/superseded/<time>/` (never deletes them).

    Used when training continues from an older (best) step: the newer steps would otherwise be
    overwritten or confuse "latest".

    Returns:
      The folder they were moved to, or None if there was nothing to move.
    """
    steps = sorted(steps)
    if not steps:
        return None
    dest = workdir / "superseded" / time.strftime("%Y%m%d-%H%M%S")
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
