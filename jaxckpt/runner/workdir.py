"""The run directory: exclusive lock, log file, resolved config, and setting newer steps aside.

A workdir belongs to one experiment and one writer at a time. The lock is an `fcntl.flock` on
`WORKDIR/.lock`, which the kernel releases when the holder dies, so a crash never leaves a stale
lock behind; the file records the holder's pid and host for the error message.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import shutil
import socket
import sys
import time
from pathlib import Path
from typing import Any, Iterable

from jaxckpt.errors import WorkdirError

LOG_NAME = "jaxckpt"
log = logging.getLogger(LOG_NAME)


class WorkdirLock:
    """Exclusive, crash-safe lock on a run directory.

    Example:
      >>> with WorkdirLock("/tmp/run"):  # doctest: +SKIP
      ...   train()
    """

    def __init__(self, workdir: str | os.PathLike):
        self.path = Path(workdir) / ".lock"
        self._fd: int | None = None

    def acquire(self) -> "WorkdirLock":
        """Takes the lock without waiting; it is dropped by `release` or when the process dies.

        Creates the workdir if needed and writes this process's pid and host into `.lock`, so the
        next process refused the lock can say who holds it.

        Returns:
          This lock, held.

        Raises:
          WorkdirError: if another process holds the lock; the message names it.
          OSError: if the lock file cannot be created or locked for another reason.
        """
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = os.read(fd, 200).decode(errors="replace").strip() or "another process"
            os.close(fd)
            if e.errno in (errno.EAGAIN, errno.EACCES):
                raise WorkdirError(
                    f"workdir {self.path.parent} is in use by {holder}. Two runs must not write one "
                    "workdir: wait for it to finish, stop it, or pass another --workdir.") from None
            raise
        # The previous holder may have died; its pid is stale text, overwrite it.
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}".encode())
        self._fd = fd
        return self

    def release(self) -> None:
        """Drops the lock if this object holds it; calling it again, or unheld, does nothing.

        The `.lock` file stays (an unlocked file is not a lock), holding the last holder's pid.
        """
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> "WorkdirLock":
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()


class _NoBackgroundTracebacks(logging.Filter):
    """Drops the traceback from Orbax's error logs and asyncio's "never retrieved" reports.

    Orbax logs a failed background write (e.g. a full disk) with its traceback, and asyncio reports
    the sibling writes it abandoned, then Orbax raises the same error to us. We report that error
    in one message naming the step and the fix; a second, longer account of it on stderr only
    buries ours. The messages themselves (with the error text) are kept.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and (record.name == "asyncio" or f"{os.sep}orbax{os.sep}" in record.pathname):
            record.exc_info = record.exc_text = None
        return True


class _NoReadOnlyNotes(logging.Filter):
    """Drops Orbax's warnings that a read-only `CheckpointManager` is read-only.

    We open another run's checkpoints (resume_file, pretrained) read-only on purpose, and Orbax
    warns about it on every open ("Given directory is read only=...", "read_only=True, setting
    save_interval_steps=0."). Only these exact notes are dropped; every other warning and error,
    from Orbax or anyone, passes.
    """

    _NOTES = ("Given directory is read only", "CheckpointManagerOptions.read_only=True, setting")

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.levelno == logging.WARNING and isinstance(record.msg, str)
                    and record.msg.startswith(self._NOTES) and f"{os.sep}orbax{os.sep}" in record.pathname)


def quiet_library_logs() -> None:
    """Keeps only warnings from JAX, Orbax and tfds, which log every save phase and backend probe at INFO.

    Orbax's notes that a read-only checkpoint directory is read-only are dropped too, and the
    tracebacks of its background write errors (we report those errors ourselves, in one message).
    """
    logging.getLogger().setLevel(logging.WARNING)
    logging.getLogger("absl").setLevel(logging.WARNING)
    for name, filters in (("absl", (_NoBackgroundTracebacks, _NoReadOnlyNotes)), ("asyncio", (_NoBackgroundTracebacks,))):
        logger = logging.getLogger(name)
        for kind in filters:
            if not any(isinstance(f, kind) for f in logger.filters):
                logger.addFilter(kind())


def setup_logging(workdir: str | os.PathLike | None, *, write: bool = True,
                  filename: str = "train.log") -> logging.Logger:
    """Sends the `jaxckpt` logger to stderr and (when `write`) to `WORKDIR/<filename>` (`train.log`)."""
    log.setLevel(logging.INFO)
    log.propagate = False
    quiet_library_logs()
    for handler in list(log.handlers):
        log.removeHandler(handler)
        handler.close()
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%Y-%m-%d %H:%M:%S")
    stream = logging.StreamHandler(sys.stderr)
    stream.setFormatter(fmt)
    log.addHandler(stream)
    if workdir is not None and write:
        Path(workdir).mkdir(parents=True, exist_ok=True)
        file_handler = logging.FileHandler(Path(workdir) / filename)
        file_handler.setFormatter(fmt)
        log.addHandler(file_handler)
    return log


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


_ABSENT = "(absent)"


def flat_config(config: Any, prefix: str = "") -> dict[str, Any]:
    """A config as `{"train.num_steps": 600, ...}`, with values as JSON gives them back.

    Args:
      config: a nested mapping (a saved `config.json`) or an `ml_collections.ConfigDict`.
      prefix: prepended to every key (for recursion).

    Returns:
      One entry per leaf field; tuples become lists, so a saved config and a live one compare equal.
    """
    if hasattr(config, "to_dict"):
        config = config.to_dict()
    out = {}
    for key, value in config.items():
        if isinstance(value, dict):
            out.update(flat_config(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = json.loads(json.dumps(value, default=str))
    return out


def config_changes(before: Any, after: Any) -> list[tuple[str, Any, Any]]:
    """The fields whose values differ between two configs, sorted by key.

    Args:
      before: the earlier config (e.g. the one saved in a checkpoint), as for `flat_config`; None
        counts as empty.
      after: the later config.

    Returns:
      `[(key, before_value, after_value), ...]`; a field one side lacks shows as "(absent)".

    Example:
      >>> config_changes({"train": {"num_steps": 400}}, {"train": {"num_steps": 600}})
      [('train.num_steps', 400, 600)]
    """
    old, new = flat_config(before or {}), flat_config(after or {})
    return [(k, old.get(k, _ABSENT), new.get(k, _ABSENT)) for k in sorted(set(old) | set(new))
            if old.get(k, _ABSENT) != new.get(k, _ABSENT)]


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
