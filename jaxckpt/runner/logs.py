"""The run's log: the `jaxckpt` logger's handlers (stderr, `WORKDIR/train.log`) and filters for library noise.

`setup_logging` and `quiet_library_logs` change process-wide logging state, so only the loop run
from a command line calls them (see STYLE #12); modules log through `log`.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

LOG_NAME = "jaxckpt"
log = logging.getLogger(LOG_NAME)


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


def setup_logging(workdir: str | os.PathLike | None = None, *, write: bool = True) -> logging.Logger:
    """For command-line entry points: sends the `jaxckpt` logger to stderr (and, with a `workdir`
    and `write`, to `WORKDIR/train.log`) and quiets the libraries' INFO logs (process-wide)."""
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
        file_handler = logging.FileHandler(Path(workdir) / "train.log")
        file_handler.setFormatter(fmt)
        log.addHandler(file_handler)
    return log
