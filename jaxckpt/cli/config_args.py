"""`--config FILE [--config.KEY=VALUE ...]` on a command line: loading it locked, and one-line errors.

`python -m jaxckpt plan` loads a config with `load_config`; `experiments/run.py` parses its own
flags with absl and reports what goes wrong with `config_error` (as `jaxckpt.cli.config_error`).
"""

from __future__ import annotations

import os
import re
from typing import Any, Sequence

from jaxckpt.errors import UserError


def _config_path(argv: Sequence[str]) -> str | None:
    """The config file named by the last `--config FILE` / `--config=FILE` in `argv` (as absl takes it)."""
    path = None
    for i, arg in enumerate(argv):
        if arg == "--config" and i + 1 < len(argv):
            path = argv[i + 1]
        elif arg.startswith("--config="):
            path = arg[len("--config="):]
    return path.split(":", 1)[0] if path else None


def config_error(error: BaseException, argv: Sequence[str]) -> str:
    """One line saying what is wrong with `--config FILE [--config.KEY=VALUE ...]`, for a user.

    ml_collections reports an override of a section the locked config lacks (`--config.trian.x=1`)
    as a KeyError, and of a field it lacks (`--config.train.nmu_steps=1`) as an AttributeError
    wrapping one; both quote the key, on a line of their own, and may add 'Did you mean "train"
    instead of "trian"?'. A config file that cannot be loaded surfaces as an OSError when the
    config is first read. Anything else (a value absl cannot parse) is absl's message on one line.

    Args:
      error: what parsing the flags, or first reading the config, raised.
      argv: the command line, to name the override or the config file at fault.

    Returns:
      The message, e.g. `unknown config key 'trian' in --config.trian.num_steps=3 (did you mean
      'train'?). The config is locked: override only fields its get_config() defines.`
    """
    inner = error
    while inner.args and isinstance(inner.args[0], BaseException):
        inner = inner.args[0]
    raw = str(inner.args[0]) if inner.args else str(inner)
    if isinstance(inner, (KeyError, AttributeError)):
        quoted = re.match(r"""\s*['"]([^'"]+)['"]""", raw)
        key = quoted[1] if quoted else raw.split("\n", 1)[0]
        overrides = [a for a in argv if a.startswith("--config.") and key in a.split("=", 1)[0].split(".")]
        suggestion = re.search(r'Did you mean "([^"]+)"', raw)
        hint = f" (did you mean {suggestion[1]!r}?)" if suggestion else ""
        where = f" in {overrides[0]}" if overrides else ""
        return (f"unknown config key {key!r}{where}{hint}. The config is locked: override only fields its "
                "get_config() defines.")
    if isinstance(inner, OSError):
        path = _config_path(argv)
        if path and not os.path.isfile(path):
            return (f"config file {path!r} does not exist; pass --config PATH/TO/CONFIG.py "
                    "(e.g. experiments/configs/digits.py).")
        reason = [line.strip() for line in raw.splitlines() if line.strip()][-1:] or [raw]
        return f"cannot load the config file {path!r}: {reason[0]}"
    if isinstance(inner, SyntaxError):
        return f"cannot load the config file {_config_path(argv)!r}: SyntaxError: {inner}"
    lines = [line.strip() for line in raw.splitlines() if line.strip()]
    if any(line.startswith("Traceback (most recent call last)") for line in lines):
        # absl embeds the traceback of an error raised by get_config(); its last line says what.
        return f"{lines[0]} {lines[-1]}"
    return " ".join(lines)


def load_config(config_args: Sequence[str]) -> Any:
    """Parses `--config FILE [--config.KEY=VALUE ...]` with ml_collections, locked like the loop's.

    Raises:
      UserError: for a missing or broken config file, an unknown key or a bad value, in one line.
    """
    from absl import flags
    from ml_collections import config_flags

    argv = ["jaxckpt plan", *config_args]
    flag_values = flags.FlagValues()
    holder = config_flags.DEFINE_config_file("config", None, "Experiment config file (get_config()).",
                                             flag_values=flag_values, lock_config=True, sys_argv=argv)
    try:
        rest = flag_values(argv)
        config = holder.value
        if config is not None:
            config.get("task")  # a config file that failed to load raises only when first read
    except (flags.Error, KeyError, AttributeError, OSError, SyntaxError) as e:
        prefix = "bad config flag: " if isinstance(e, flags.Error) else ""
        raise UserError(prefix + config_error(e, argv)) from None
    if len(rest) > 1:
        raise UserError(f"unexpected arguments: {' '.join(rest[1:])}")
    if config is None:
        raise UserError("plan needs --config FILE (an experiment config with get_config()).")
    return config
