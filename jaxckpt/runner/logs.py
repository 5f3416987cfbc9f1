"""The run's log: the `jaxckpt` logger's handlers (stderr, `WORKDIR/train.log`) and filters for library noise.

`setup_logging` and `quiet_library_logs` change process-wide logging state, so only the loop run
from a command line calls them (see STYLE #12); modules log through `log`.

`file_handler(path)` is a plain `logging.FileHandler` for a local path. For a `gs://` or `s3://`
path it is an `UploadingHandler`: an object cannot be appended to, so records go to a local
temporary file and the whole log is uploaded (one PUT) at most every `UPLOAD_EVERY_S` seconds
while records arrive, at once for a WARNING or worse, and at close. A run killed without closing
it loses at most the last few seconds of its log.
"""

from __future__ import annotations

import logging
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

from jaxckpt.checkpoint import storage

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


UPLOAD_EVERY_S = 10.0
"""The longest a record waits on the local disk before an `UploadingHandler` uploads it."""

_FORMAT = ("%(asctime)s %(levelname)s %(message)s", "%Y-%m-%d %H:%M:%S")


class UploadingHandler(logging.FileHandler):
    """Keeps a log file on an object store up to date: appends locally, uploads the whole file.

    The local copy is a temporary file, removed at close. An object already at `url` (the log of
    an earlier run in the same workdir) is downloaded first, so the log grows across reruns as a
    local `train.log` does. An upload that fails is reported through `handleError` (stderr) and
    retried with the next upload: a flaky store never stops the run.

    Args:
      url: the log object, e.g. `gs://bucket/run/train.log`.
      every_s: the longest a record waits before it is uploaded.
    """

    def __init__(self, url: os.PathLike | str, *, every_s: float = UPLOAD_EVERY_S):
        self.target = str(storage.as_path(url))
        try:
            existing = storage.as_path(url).read_bytes()
        except FileNotFoundError:
            existing = b""
        fd, local = tempfile.mkstemp(prefix="jaxckpt-log-", suffix=".log")
        with os.fdopen(fd, "wb") as f:
            f.write(existing)
        super().__init__(local, mode="a", encoding="utf-8")
        self.every_s = float(every_s)
        self._uploaded_at = time.monotonic()
        self._pending = False
        self._timer: threading.Timer | None = None

    def emit(self, record: logging.LogRecord) -> None:
        super().emit(record)  # called with the handler's lock held
        self._pending = True
        if record.levelno >= logging.WARNING or time.monotonic() - self._uploaded_at >= self.every_s:
            self._upload()
        elif self._timer is None:  # records that stop arriving still go up within `every_s`
            wait = self.every_s - (time.monotonic() - self._uploaded_at)
            self._timer = threading.Timer(max(wait, 0.0), self._upload_pending)
            self._timer.daemon = True
            self._timer.start()

    def _upload_pending(self) -> None:
        with self.lock:
            self._timer = None
            if self._pending and self.stream is not None:
                self._upload()

    def _upload(self) -> None:
        self.flush()
        try:
            storage.write_bytes_atomic(self.target, Path(self.baseFilename).read_bytes())
        except Exception:
            self.handleError(logging.makeLogRecord({"msg": f"could not upload the log to {self.target}"}))
            return
        self._uploaded_at = time.monotonic()
        self._pending = False

    def close(self) -> None:
        """Uploads what is pending, then removes the local copy (idempotent)."""
        with self.lock:
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            if self.stream is not None and self._pending:
                self._upload()
            super().close()
            if os.path.exists(self.baseFilename):
                os.unlink(self.baseFilename)


def file_handler(path: os.PathLike | str) -> logging.Handler:
    """A handler appending the run's log format to `path`: a `FileHandler`, or an `UploadingHandler` for a URL."""
    if storage.is_url(path):
        handler: logging.Handler = UploadingHandler(path)
    else:
        handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter(*_FORMAT))
    return handler


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


def setup_logging(workdir: str | os.PathLike | None = None, *, write: bool = True,
                  filename: str = "train.log") -> logging.Logger:
    """For command-line entry points: sends the `jaxckpt` logger to stderr (and, with a `workdir`
    and `write`, to `WORKDIR/<filename>`) and quiets the libraries' INFO logs (process-wide)."""
    log.setLevel(logging.INFO)
    log.propagate = False
    quiet_library_logs()
    for handler in list(log.handlers):
        log.removeHandler(handler)
        handler.close()
    stream = logging.StreamHandler(sys.stderr)
    stream.setFormatter(logging.Formatter(*_FORMAT))
    log.addHandler(stream)
    if workdir is not None and write:
        directory = storage.run_path(workdir, key="workdir")
        if not storage.is_url(directory):  # an object store has no directories to create
            directory.mkdir(parents=True, exist_ok=True)
        log.addHandler(file_handler(directory / filename))
    return log
