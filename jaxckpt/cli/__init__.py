"""The `python -m jaxckpt` command line: inspect, plan, export, zoo."""

from jaxckpt.cli.commands import config_error, main

__all__ = ("config_error", "main")
