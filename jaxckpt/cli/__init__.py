"""The `python -m jaxckpt` command line: inspect, plan, export, zoo."""

from __future__ import annotations

import sys
from typing import Sequence

from jaxckpt.cli.config_args import config_error
from jaxckpt.errors import MissingDependencyError


def main(argv: Sequence[str] | None = None) -> int:
    """Runs `python -m jaxckpt ...` (see `jaxckpt.cli.commands.main`); without the `runner` extra, says so in one line.

    Returns:
        The exit code: 2 when the extra is missing.
    """
    try:
        import jaxckpt.cli.commands as commands
    except MissingDependencyError as e:
        print(f"jaxckpt: error: {e}", file=sys.stderr)
        return 2
    return commands.main(argv)


__all__ = ("config_error", "main")
