"""Who writes a checkpoint directory, so that only a gone writer's unfinished saves are removed.

A save in flight lives in `<step>.orbax-checkpoint-tmp-*` until Orbax renames it into place. A save
killed mid-way leaves that directory behind, and nothing else ever removes it; but the same name
belongs to a live save of another process writing the directory. So every writable
`CheckpointManager` leaves a record `.jaxckpt-writer.<host>.<pid>` in the directory while it is
open, and a new one removes unfinished saves only when no other record belongs to a live process:
a record of a dead process on this host is stale (and removed); a record from another host, or of
a live process, keeps every unfinished save where it is (logged, never deleted).
"""

from __future__ import annotations

import logging
import os
import pathlib
import shutil
import socket

TMP_MARK = ".orbax-checkpoint-tmp"
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


def _record_path(directory: pathlib.Path) -> pathlib.Path:
    return directory / f"{_RECORD}{socket.gethostname()}.{os.getpid()}"


def other_live_writers(directory: pathlib.Path) -> list[str]:
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


def register(directory: pathlib.Path) -> pathlib.Path:
    """Records this process as a writer of `directory`; returns the record (remove it on close)."""
    path = _record_path(directory)
    path.touch()
    return path


def unregister(record: pathlib.Path) -> None:
    """Removes a record `register` made (this writer is done with the directory)."""
    record.unlink(missing_ok=True)


def remove_unfinished_saves(directory: pathlib.Path) -> list[pathlib.Path]:
    """Removes the leftovers of killed saves in `directory` if no other writer may be alive.

    Returns:
      What was removed ([] if another writer may still be saving there).
    """
    leftovers = sorted(directory.glob(f"*{TMP_MARK}*"))
    if not leftovers:
        return []
    live = other_live_writers(directory)
    if live:
        log.warning("left %d unfinished save(s) in %s alone: %s may still be writing there (%s)", len(leftovers),
                    directory, " and ".join(live), ", ".join(p.name for p in leftovers))
        return []
    for leftover in leftovers:
        shutil.rmtree(leftover, ignore_errors=True) if leftover.is_dir() else leftover.unlink(missing_ok=True)
    return leftovers
