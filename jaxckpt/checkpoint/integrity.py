"""Whether a failed read of a step proves the step damaged: the one place that decides.

A step is quarantined (moved to `corrupt/`) only on proof: an array whose bytes differ from the
checksum recorded at save time, a stored chunk of the wrong size, tensorstore saying the data is
lost, undecodable or short, a file of the step that its own records list but that is gone, or a
metadata file of a committed step that does not parse. Anything else (too many open files, an I/O
error of a network disk, no memory, permission denied, a time-out, a storage server's 5xx, or an
error nobody foresaw, such as an Orbax API change) says nothing about the bytes on disk: the read is
retried where a second attempt can succeed, and then fails with `CheckpointReadError`, moving
nothing, so a rerun once the cause is gone resumes from the same step.

Tensorstore reports an OS error as a status whose message ends in `[os_error_code='N']` (EIO as
UNKNOWN, EMFILE/ENFILE/ENOMEM as RESOURCE_EXHAUSTED, EACCES as PERMISSION_DENIED); it retries
EAGAIN itself.
"""

from __future__ import annotations

import errno
import json
import os
import re
import time
from typing import Callable, Iterator, TypeVar

from jaxckpt.checkpoint import storage
from jaxckpt.errors import (
    CheckpointCorruptError,
    CheckpointFormatError,
    CheckpointReadError,
    ChecksumMismatch,
    ChunkSizeMismatch,
)

T = TypeVar("T")

ATTEMPTS = 3
"""Reads of a step tried before a transient error is reported (waiting `BACKOFF_SECONDS` between)."""
BACKOFF_SECONDS = (0.2, 1.0)

# Tensorstore status codes that describe the stored bytes themselves.
_DAMAGE_CODES = ("DATA_LOSS", "OUT_OF_RANGE")
_DAMAGE_TEXT = ("Error decoding",)
# Status codes and texts of a refused or interrupted read: the bytes may well be fine.
_PERMISSION = ("PERMISSION_DENIED",)
_TRANSIENT = ("RESOURCE_EXHAUSTED", "UNAVAILABLE", "DEADLINE_EXCEEDED", "ABORTED", "UNKNOWN")
_PERMISSION_ERRNOS = (errno.EACCES, errno.EPERM, errno.EROFS)
_OS_ERROR_CODE = re.compile(r"os_error_code='(\d+)'")
_HTTP_5XX = re.compile(r"\b(?:HTTP|status(?: code)?)\D{0,3}5\d\d\b", re.IGNORECASE)


def exception_chain(exc: BaseException) -> Iterator[BaseException]:
    """`exc`, its causes and contexts, and the members of exception groups, each once."""
    seen, todo = set(), [exc]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        yield e
        todo += [e.__cause__, e.__context__, *getattr(e, "exceptions", ())]


def damage(exc: BaseException, step_dir: os.PathLike | str) -> str | None:
    """What proves the step damaged, or None if `exc` proves nothing about its bytes.

    Args:
      exc: what a read of the step raised.
      step_dir: the step directory (a missing file proves damage only while the step itself exists).
    """
    for e in exception_chain(exc):
        if isinstance(e, (ChecksumMismatch, ChunkSizeMismatch)):
            return str(e)
        if isinstance(e, json.JSONDecodeError):
            return f"a metadata file does not parse ({e})"  # (its message names the file)
        codes = [int(c) for c in _OS_ERROR_CODE.findall(str(e))]
        if codes and any(c != errno.ENOENT for c in codes):
            continue  # an OS error reading the file: says nothing about its bytes
        text = str(e)
        if any(code in text for code in _DAMAGE_CODES) or any(t in text for t in _DAMAGE_TEXT):
            return text
        missing = isinstance(e, FileNotFoundError) or text.startswith("NOT_FOUND") or errno.ENOENT in codes
        if missing and storage.run_path(step_dir).is_dir():
            return f"a file of the step is missing ({text})"
    return None


def cause(exc: BaseException) -> tuple[str, bool]:
    """A one-line cause of a read failure that proves no damage, and whether retrying may help."""
    for e in exception_chain(exc):
        if isinstance(e, MemoryError):
            return "out of memory (MemoryError)", True
        if isinstance(e, TimeoutError):
            return f"timed out ({e})", True
        text = str(e)
        codes = [int(c) for c in _OS_ERROR_CODE.findall(text)]
        if isinstance(e, OSError) and e.errno:
            codes.append(e.errno)
        if codes:
            code = codes[0]
            name = errno.errorcode.get(code, str(code))
            return f"{name} ({os.strerror(code)})", code not in _PERMISSION_ERRNOS
        if any(c in text for c in _PERMISSION):
            return f"permission denied ({_first_line(text)})", False
        if any(text.startswith(c) for c in _TRANSIENT) or _HTTP_5XX.search(text):
            return _first_line(text), True
    return f"{type(exc).__name__}: {_first_line(str(exc))}", False


def _first_line(text: str) -> str:
    return text.strip().splitlines()[0] if text.strip() else "(no message)"


def read_step(step_dir: os.PathLike | str, read: Callable[[], T], *, what: str = "the arrays",
              sleep: Callable[[float], None] = time.sleep) -> T:
    """Calls `read()` (a read of one step), retrying transient failures; classifies what it raises.

    Args:
      step_dir: the step directory being read, for the messages.
      read: the read; called up to `ATTEMPTS` times.
      what: what is read, for the messages ("the arrays", "the array metadata").
      sleep: waits between attempts (tests pass a no-op).

    Returns:
      What `read()` returned.

    Raises:
      CheckpointCorruptError: if the failure proves the step damaged (quarantine is allowed).
      CheckpointReadError: for any other failure, after the retries; the step may be intact.
      CheckpointFormatError: raised by `read` for a step of a newer format, unchanged.
      ValueError: a read's own `ValueError` that is not about the bytes (e.g. a target of other
        shapes) passes through unchanged when `read` raises it before touching the disk.
    """
    step_dir = storage.run_path(step_dir)
    for attempt in range(ATTEMPTS):
        try:
            return read()
        except (CheckpointCorruptError, CheckpointReadError, CheckpointFormatError):
            raise
        except Exception as e:  # noqa: BLE001 (classified below; nothing is swallowed)
            proof = damage(e, step_dir)
            if proof is not None:
                raise CheckpointCorruptError(
                    f"Cannot read {what} of step {step_dir.name} at {step_dir}: it is corrupt: {proof}. The step "
                    "directory is incomplete or damaged; restore another step, or restore with fallback=True.",
                    step_dir) from e
            reason, retry = cause(e)
            if retry and attempt + 1 < ATTEMPTS:
                sleep(BACKOFF_SECONDS[min(attempt, len(BACKOFF_SECONDS) - 1)])
                continue
            tries = f" ({attempt + 1} attempts)" if attempt else ""
            raise CheckpointReadError(
                f"Cannot read {what} of step {step_dir.name} at {step_dir}: {reason}{tries}. Nothing was moved: "
                "the step may be intact; fix the cause and rerun.", step_dir) from e
    raise AssertionError("unreachable")
