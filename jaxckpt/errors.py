"""Every exception type jaxckpt raises, in one place.

`UserError` and its subclasses are failures the user resolves by changing an input; their messages
name the culprit (a path, a key, a shape) and the fix. The others are conditions a caller may want
to handle: a missing or corrupt checkpoint, a failed save, a preempted run.
"""

from __future__ import annotations

import os
import pathlib
import signal
import sys
import sysconfig


class UserError(RuntimeError):
    """A failure the user resolves by changing an input; the message names the culprit and the fix."""


class ConfigError(UserError, ValueError):
    """A config value that cannot work (an unknown choice, a width of 0); the message names the key.

    Tasks raise it for their own config fields, so the command line prints it as one line (exit 2)
    while a `ValueError` from a bug in task code keeps its traceback. Also a `ValueError`, so
    `except ValueError` around config checks still catches it.
    """


class MissingDependencyError(UserError, ImportError):
    """An optional package that an input needs (torch for a `.pt` file) is not installed.

    A `UserError`, so command-line entry points print its message and exit 2 instead of a traceback;
    also an `ImportError`, so `except ImportError` around optional features still catches it.
    """


PREEMPTED_EXIT_CODE = 75
"""Exit code of a run stopped by SIGTERM/SIGINT after saving (EX_TEMPFAIL: rerun to continue)."""


class Preempted(Exception):
    """Raised by the loop after it saved and committed a checkpoint because a signal asked it to stop."""

    def __init__(self, step: int, signum: int):
        self.step = step
        self.signum = signum
        super().__init__(
            f"stopped by {signal.Signals(signum).name} after saving step {step}; rerun the same "
            f"command to continue (exit code {PREEMPTED_EXIT_CODE}).")


class CheckpointNotFoundError(FileNotFoundError):
    """No checkpoint where one was asked for (an empty directory, a missing step, no best step)."""


class CheckpointCorruptError(RuntimeError):
    """A step directory whose arrays cannot be read or do not match their saved checksums."""

    def __init__(self, message: str, step_dir: os.PathLike | str):
        super().__init__(message)
        self.step_dir = pathlib.Path(step_dir)


class CheckpointReadError(UserError):
    """A step could not be read for a reason that proves nothing about its bytes (EMFILE, EIO, ENOMEM,
    permission denied, a time-out, ...): nothing was moved, and a rerun once the cause is gone reads it.
    """

    def __init__(self, message: str, step_dir: os.PathLike | str):
        super().__init__(message)
        self.step_dir = pathlib.Path(step_dir)


class CheckpointFormatError(UserError):
    """A step written by a newer jaxckpt format than this release reads: upgrade jaxckpt to read it."""


class CheckpointSaveError(RuntimeError):
    """A save failed (e.g. the disk is full); earlier checkpoints are left as they were."""


class ChecksumMismatch(ValueError):
    """Arrays whose bytes differ from the hash recorded when they were written."""

    def __init__(self, paths: list[str]):
        self.paths = paths
        super().__init__(f"{len(paths)} array(s) differ from the checksums recorded at save time "
                         f"({', '.join(paths[:5])}{', ...' if len(paths) > 5 else ''})")


class ChunkSizeMismatch(ValueError):
    """A stored array chunk whose size differs from the one its recorded shape and dtype give."""


class NonFiniteLossError(UserError):
    """The training loss became NaN or inf; the last good checkpoint is kept and never marked best."""


class SaveFailedError(UserError, CheckpointSaveError):
    """A checkpoint save failed during a run (e.g. the disk is full); earlier checkpoints are intact."""


class CorruptCheckpointsError(UserError):
    """The checkpoint to start from is unreadable or fails its checksums; the message names it."""


class WorkdirError(UserError):
    """A problem with the run directory that the user must resolve (message says how)."""


class ZooEntryNotFoundError(CheckpointNotFoundError):
    """`zoo:NAME` names no entry in the zoo folder."""


def is_user_error(error: BaseException) -> bool:
    """Whether `error` is about the user's input (one line, exit 2) rather than a bug (a traceback).

    A `UserError` always is, and so is one of this module's `ValueError`/`OSError` types (such as
    `CheckpointNotFoundError`). Another `ValueError` or `OSError` is when jaxckpt raised it, or a library
    raised it for jaxckpt (a missing file that Orbax failed to open): the innermost frame of its
    traceback that is not in the standard library or an installed package belongs to jaxckpt. The
    same error raised from a user's `loss_fn` or task code is a bug in that code, and keeps its
    traceback.

    Args:
      error: a raised exception.

    Returns:
      True for errors the user fixes by changing an input.
    """
    if isinstance(error, UserError):
        return True
    if not isinstance(error, (ValueError, OSError)):
        return False
    if type(error).__module__ == __name__:  # jaxckpt's own ValueError/OSError types (CheckpointNotFoundError)
        return True
    frames = []
    tb = error.__traceback__
    while tb is not None:
        frames.append(tb.tb_frame.f_code.co_filename)
        tb = tb.tb_next
    for filename in reversed(frames):
        if filename.startswith(_PACKAGE_DIR):
            return True
        if not filename.startswith(_LIBRARY_DIRS) and not filename.startswith("<"):
            return False  # the user's own code raised it
    return True


_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep
_LIBRARY_DIRS = tuple({os.path.abspath(sysconfig.get_paths()[k]) + os.sep for k in ("stdlib", "purelib", "platlib")}
                      | {os.path.abspath(p) + os.sep for p in sys.path if p.endswith("site-packages")})
