"""How command-line entry points report failures: user errors get one line, bugs a traceback.

Everything here changes or reads process-wide state (stderr, `sys.unraisablehook`), so only entry
points (`python -m jaxckpt`, `experiments/run.py`) call it; the library itself never does.
"""

from __future__ import annotations

import sys
from typing import Any, Callable

from jaxckpt.errors import PREEMPTED_EXIT_CODE, Preempted, UserError, is_user_error

USER_ERROR_EXIT_CODE = 2


def _drop_late_loop_callbacks(unraisable: Any) -> None:
    """`sys.unraisablehook` that drops one known-harmless message and passes the rest on.

    When one array read of an Orbax restore fails (a corrupt file), Orbax closes its event loop
    while the other reads are still in flight; each of those then raises "Event loop is closed"
    from a tensorstore callback, which Python prints as an ignored exception with a traceback.
    The failure itself is reported by the caller, so these add nothing but noise.
    """
    exc = unraisable.exc_value
    if isinstance(exc, RuntimeError) and str(exc) == "Event loop is closed":
        return
    sys.__unraisablehook__(unraisable)


def quiet_late_loop_callbacks() -> None:
    """Installs `_drop_late_loop_callbacks` for this process; for command-line entry points only."""
    sys.unraisablehook = _drop_late_loop_callbacks


def describe(exc: BaseException) -> str:
    """The message of a user error, after one prefix for all (`jaxckpt: error: `).

    jaxckpt's own errors and `ValueError`s say what happened in words; another `OSError`
    ("[Errno 13] Permission denied: 'x'") keeps its type name, which says more than its text.
    """
    if isinstance(exc, (UserError, ValueError)) or type(exc).__module__ == "jaxckpt.errors":
        return str(exc)
    return f"{type(exc).__name__}: {exc}"


def exit_code_of(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> int:
    """Calls `fn`; returns 0, or prints a user error to stderr (no traceback) and returns its code.

    `Preempted` returns `PREEMPTED_EXIT_CODE`; errors that are not the user's (see
    `jaxckpt.errors.is_user_error`: a bug in jaxckpt, or any exception from task code) propagate
    with their traceback, because they are bugs to report rather than inputs to fix.
    """
    quiet_late_loop_callbacks()
    try:
        fn(*args, **kwargs)
    except Preempted as e:
        print(f"jaxckpt: {e}", file=sys.stderr)
        return PREEMPTED_EXIT_CODE
    except Exception as e:
        if not is_user_error(e):
            raise
        print(f"jaxckpt: error: {describe(e)}", file=sys.stderr)
        return USER_ERROR_EXIT_CODE
    return 0


def run_or_exit(config: Any, workdir: Any) -> int:
    """`jaxckpt.run` for command lines: returns an exit code, printing user errors without a traceback.

    It is the entry point's business to set up logging on stderr and quiet the libraries' INFO
    logs; this does both, then runs.

    Args:
      config: as for `jaxckpt.run`.
      workdir: as for `jaxckpt.run`.

    Returns:
      0 on success; `USER_ERROR_EXIT_CODE` (2) after printing a user error (bad config, path or
      input) as one line to stderr; `PREEMPTED_EXIT_CODE` (75) when a signal stopped a train run
      after saving, so a scheduler reruns it to continue.

    Raises:
      Exception: any error that is not the user's (a bug, in jaxckpt or in task code), with its traceback.

    Example:
      >>> sys.exit(run_or_exit(config, "runs/digits"))  # doctest: +SKIP
    """
    from jaxckpt.runner.logs import setup_logging
    from jaxckpt.runner.loop import run

    setup_logging()
    return exit_code_of(run, config, workdir)
