"""Who writes a checkpoint directory, so that only a gone writer's unfinished saves are removed.

A save in flight lives in `<step>.orbax-checkpoint-tmp-*` until Orbax renames it into place. A save
killed mid-way leaves that directory behind, and nothing else ever removes it; but the same name
belongs to a live save of another process writing the directory. So every writable
`CheckpointManager` leaves a record `.jaxckpt-writer.<host>.<pid>` in the directory while it is
open, and a new one removes unfinished saves only when no other record belongs to a live process:
a record of a dead process on this host is stale (and removed); a record from another host, or of
a live process, keeps every unfinished save where it is (logged, never deleted).

On `gs://` and `s3://` a save is written in place as `<step>/` and committed by its
`commit_success.txt` (Orbax's COMMIT_FILE atomicity, `storage.atomicity_options`): an unfinished
save is a step folder without that marker, which Orbax already leaves out of its steps. The same
records decide whether it may be removed.
"""

from __future__ import annotations

import logging
import os
import shutil
import socket

from jaxckpt.checkpoint import storage

TMP_MARK = ".orbax-checkpoint-tmp"
COMMIT_FILE = "commit_success.txt"  # Orbax's marker of a committed step on an object store
_RECORD = ".jaxckpt-writer."

log = logging.getLogger("jaxckpt")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def _record_path(directory: storage.AnyPath) -> storage.AnyPath:
    return directory / f"{_RECORD}{socket.gethostname()}.{os.getpid()}"


def other_live_writers(directory: storage.AnyPath) -> list[str]:
    """Records of other writers of `directory` that may be alive ("host pid"); stale ones are removed."""
    host, me = socket.gethostname(), os.getpid()
    live = []
    for record in directory.glob(f"{_RECORD}*"):
        rest = record.name[len(_RECORD):]
        their_host, _, pid = rest.rpartition(".")
        if not pid.isdigit() or (their_host == host and int(pid) == me):
            continue
        if their_host == host and not _alive(int(pid)):
            record.unlink(missing_ok=True)  # a writer killed without closing
            continue
        live.append(f"pid {pid} on {their_host}")
    return live


def register(directory: storage.AnyPath) -> storage.AnyPath:
    """Records this process as a writer of `directory`; returns the record (remove it on close)."""
    path = _record_path(directory)
    path.touch()
    return path


def unregister(record: storage.AnyPath) -> None:
    """Removes a record `register` made (this writer is done with the directory)."""
    record.unlink(missing_ok=True)


def remove_unfinished_saves(directory: storage.AnyPath) -> list[storage.AnyPath]:
    """Removes the leftovers of killed saves in `directory` if no other writer may be alive.

    Returns:
      What was removed ([] if another writer may still be saving there).
    """
    leftovers = unfinished_saves(directory)
    if not leftovers:
        return []
    live = other_live_writers(directory)
    if live:
        log.warning("left %d unfinished save(s) in %s alone: %s may still be writing there (%s)", len(leftovers),
                    directory, " and ".join(live), ", ".join(p.name for p in leftovers))
        return []
    for leftover in leftovers:
        remove(leftover)
    return leftovers


def unfinished_saves(directory: storage.AnyPath, step: int | None = None) -> list[storage.AnyPath]:
    """Folders of saves that never committed (all, or those of `step`), whoever wrote them."""
    if not storage.is_url(directory):
        return sorted(directory.glob(f"{'*' if step is None else step}{TMP_MARK}*"))
    if not directory.is_dir():  # (an object store has no empty folders: nothing saved yet)
        return []
    names = [str(step)] if step is not None else [p.name for p in directory.iterdir() if p.name.isdigit()]
    return sorted(directory / name for name in names
                  if (directory / name).is_dir() and not (directory / name / COMMIT_FILE).exists())


def remove(path: storage.AnyPath) -> None:
    """Removes a file or folder, local or on an object store; a missing one is fine."""
    if storage.is_url(path):
        if path.is_dir():
            path.rmtree(missing_ok=True)
        else:
            path.unlink(missing_ok=True)
    elif path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)
