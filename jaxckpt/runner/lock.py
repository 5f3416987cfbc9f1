"""The run directory's lock: one writer per workdir, and a crash never leaves a stale lock.

The lock is an `fcntl.flock` on `WORKDIR/.lock`, which the kernel releases when the holder dies;
the file records the holder's pid and host for the error message. A workdir on `gs://` or
`s3://` has no flock: `jaxckpt.runner.object_lock.lock_for` gives it a leased lock object instead.

`run` registers the lock it holds with `holding`, so code deeper in the run finds it by workdir
(`run_lock`) to check that it still holds it before a save (an object lock's lease can be taken
over), and `holds_lock` answers for both kinds.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import socket
from pathlib import Path
from typing import Any, Iterator

from jaxckpt.checkpoint import storage
from jaxckpt.errors import WorkdirError

_HELD: set[Path] = set()  # `.lock` files this process holds
_RUN_LOCKS: dict[str, Any] = {}  # normalised workdir -> the lock `run` holds on it (flock or object lock)


def _key(workdir: str | os.PathLike) -> str:
    return str(storage.run_path(workdir))


def holds_lock(workdir: str | os.PathLike) -> bool:
    """Whether this process holds `workdir`'s lock (then it alone may move its checkpoints)."""
    if _key(workdir) in _RUN_LOCKS:
        return True
    return not storage.is_url(workdir) and (Path(os.path.abspath(workdir)) / ".lock") in _HELD


@contextlib.contextmanager
def holding(workdir: str | os.PathLike, lock: Any) -> Iterator[Any]:
    """Makes `lock` (held, or None on a process that holds none) `run_lock(workdir)` while the block runs."""
    key = _key(workdir)
    if lock is None:
        yield lock
        return
    _RUN_LOCKS[key] = lock
    try:
        yield lock
    finally:
        if _RUN_LOCKS.get(key) is lock:
            del _RUN_LOCKS[key]


def run_lock(workdir: str | os.PathLike) -> Any:
    """The lock `run` registered for `workdir` with `holding`, or None (e.g. on another process)."""
    return _RUN_LOCKS.get(_key(workdir))


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
        _HELD.add(Path(os.path.abspath(self.path)))
        return self

    def release(self) -> None:
        """Drops the lock if this object holds it; calling it again, or unheld, does nothing.

        The `.lock` file stays (an unlocked file is not a lock), holding the last holder's pid.
        """
        if self._fd is not None:
            _HELD.discard(Path(os.path.abspath(self.path)))
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> "WorkdirLock":
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()
