"""Pins: how a reader in another process keeps retention from deleting the step it is reading.

A follower evaluator (`jaxckpt.runner.follow`) reads steps while the trainer's `CheckpointManager`
deletes old ones. They meet in `DIRECTORY/.pins/` (beside the `<step>/` folders; Orbax lists only
step folders, so it never sees it):

    .pins/lock                          flock'ed around every decision below
    .pins/<step>.pin-<host>-<pid>       a reader is reading that step: retention keeps it
    .pins/<step>.doomed                 retention decided to delete that step: nobody may pin it;
                                        kept after the deletion while a follower is attached, so
                                        the follower learns which steps it missed (`missed`)
    .pins/follower-<split>-<host>-<pid> a follower is attached and will deliver <split> metrics

The manager's decision (`guard`) and a reader's pin (`pin`) both hold the lock, so one of two
things happens, never a mix: the pin lands first and the step is kept, or the deletion is decided
first and the pin is refused (the reader skips the step). Orbax deletes a step only after the save
that decided it commits; the `.doomed` mark covers that gap. A pin or follower file whose process
is dead (same host: its pid is gone) is ignored and removed, so a killed reader never pins a step
forever; files from another host are trusted (use one host per workdir, or remove them by hand).
The lock is `flock`, so the workdir must be on a local or POSIX-locking filesystem.

On `gs://` and `s3://` there is no such lock, so no pin files are written there: `pin` and `attach`
return the path they would have used (so callers need not ask), `guard` keeps what the policy
keeps, and `attached`/`missed` see no follower. A follower of an object-store run is then not
protected from retention deleting the step it reads (it reports that step as unreadable), and
retention does not wait for its metrics.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import pathlib
import re
import socket
from typing import Iterable, Iterator

from jaxckpt.checkpoint import storage

PINS_DIR = ".pins"
_PIN = re.compile(r"(\d+)\.pin-(.+)-(\d+)")
_DOOMED = re.compile(r"(\d+)\.doomed")
_FOLLOWER = re.compile(r"follower-([A-Za-z0-9_]+)-(.+)-(\d+)")


def _dir(directory: os.PathLike | str) -> storage.AnyPath:
    return storage.run_path(directory) / PINS_DIR


@contextlib.contextmanager
def _locked(directory: os.PathLike | str) -> Iterator[pathlib.Path]:
    pins = _dir(directory)
    pins.mkdir(parents=True, exist_ok=True)
    fd = os.open(pins / "lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield pins
    finally:
        os.close(fd)  # closing drops the flock


def _owner() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


def _alive(host: str, pid: str) -> bool:
    if host != socket.gethostname():
        return True  # cannot tell from here: trust it
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _live(pins: pathlib.Path, pattern: re.Pattern) -> list[re.Match]:
    """Matches of `pattern` among the files of live processes; files of dead ones are removed."""
    found = []
    for path in pins.iterdir() if pins.is_dir() else ():
        match = pattern.fullmatch(path.name)
        if match is None:
            continue
        if _alive(match.group(2), match.group(3)):
            found.append(match)
        else:
            path.unlink(missing_ok=True)
    return found


def pin(directory: os.PathLike | str, step: int) -> pathlib.Path | None:
    """Pins a committed step so retention keeps it until `unpin`; None if it is gone or doomed.

    Args:
      directory: the checkpoint directory holding `<step>/` folders.
      step: the step to read.

    Returns:
      The pin file (pass it to `unpin`), or None when the step is not there (never committed, or
      deleted already) or retention has decided to delete it.
    """
    if storage.is_url(directory):  # no lock to pin under (see the module docstring)
        there = (storage.run_path(directory) / str(step)).is_dir()
        return _dir(directory) / f"{step}.pin-{_owner()}" if there else None
    with _locked(directory) as pins:
        if (pins / f"{step}.doomed").exists() or not (pathlib.Path(directory) / str(step)).is_dir():
            return None
        path = pins / f"{step}.pin-{_owner()}"
        path.touch()
        return path


def unpin(path: pathlib.Path | None) -> None:
    """Removes a pin made by `pin` (None and an already removed pin are fine)."""
    if path is not None and not storage.is_url(path):
        path.unlink(missing_ok=True)


def guard(directory: os.PathLike | str, steps: Iterable[int], keep: set[int], *, mark: bool = True) -> set[int]:
    """The retention decision, with pins: returns `keep` plus the pinned steps; marks the rest doomed.

    Called by the manager (process 0) each time it decides which steps to delete. Marks of steps
    that no longer exist are cleared.

    Args:
      directory: the checkpoint directory.
      steps: the steps that exist.
      keep: the steps the retention policy keeps.
      mark: write the doomed marks (process 0 only, where Orbax deletes).

    Returns:
      The steps to keep; every other step of `steps` is marked doomed and may be deleted.
    """
    steps = set(steps)
    if storage.is_url(directory) or not _dir(directory).is_dir():
        return set(keep)  # nobody ever pinned here: no lock, no files
    with _locked(directory) as pins:
        keep = set(keep) | {int(m.group(1)) for m in _live(pins, _PIN)} & steps
        if not mark:
            return keep
        if not _live(pins, _FOLLOWER):  # nobody will read the marks of deleted steps
            _forget_gone(pins, steps)
        for step in steps - keep:
            (pins / f"{step}.doomed").touch()
    return keep


def _forget_gone(pins: pathlib.Path, steps: set[int]) -> None:
    for path in pins.iterdir():
        match = _DOOMED.fullmatch(path.name)
        if match and int(match.group(1)) not in steps:
            path.unlink(missing_ok=True)


def forget_deleted(directory: os.PathLike | str, steps: Iterable[int]) -> None:
    """Clears the doomed marks of steps that are gone; `steps` are those still there."""
    if not storage.is_url(directory) and _dir(directory).is_dir():
        with _locked(directory) as pins:
            _forget_gone(pins, set(steps))


def missed(directory: os.PathLike | str) -> list[int]:
    """Steps retention has deleted since the last call (their doomed marks are consumed), oldest first."""
    if storage.is_url(directory) or not _dir(directory).is_dir():
        return []
    gone = []
    with _locked(directory) as pins:
        for path in pins.iterdir():
            match = _DOOMED.fullmatch(path.name)
            if match and not (pathlib.Path(directory) / match.group(1)).is_dir():
                gone.append(int(match.group(1)))
                path.unlink(missing_ok=True)
    return sorted(gone)


def attach(directory: os.PathLike | str, split: str) -> pathlib.Path:
    """Registers this process as a follower delivering `split` metrics; returns the file for `detach`."""
    if not re.fullmatch(r"[A-Za-z0-9_]+", split):
        raise ValueError(f"split {split!r} must be letters, digits or '_' (e.g. 'val').")
    if storage.is_url(directory):
        return _dir(directory) / f"follower-{split}-{_owner()}"
    with _locked(directory) as pins:
        path = pins / f"follower-{split}-{_owner()}"
        path.touch()
        return path


detach = unpin
"""Removes a registration made by `attach` (the same as removing a pin)."""


def attached(directory: os.PathLike | str, split: str) -> bool:
    """Whether a live follower delivering `split` metrics is attached to `directory`."""
    if storage.is_url(directory):
        return False
    pins = _dir(directory)
    if not pins.is_dir():
        return False
    with _locked(directory) as pins:
        return any(m.group(1) == split for m in _live(pins, _FOLLOWER))
