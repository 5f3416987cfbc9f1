"""The on-disk format of a step: its number, what each number means, and which ones this release reads.

Every step records its format twice: `jaxckpt/metadata` holds `"format": N` beside the versions,
and the state item's `_METADATA["custom_metadata"]["jaxckpt"]` holds the array layout, the checksum
algorithm and (from format 2) the format again, so the state item alone says how to read it.

Formats (every release reads every earlier one; tests/fixtures/formats/ holds a run of each):

  1  jaxckpt 0.1.0 and earlier: layout "one-chunk-v1" (or Orbax's own), checksums "xxh3_64", or
     "crc32c" in builds before 0.1.0 under the same layout name (read without checking them).
  2  this release: as 1, plus the format number in the state item, the best-metric rule the steps
     were ranked by (`best_metric`, `best_mode`) and the writer that wrote the state ("fast" or
     "orbax") in `jaxckpt/metadata`.

A step of a format newer than `FORMAT` is refused (`CheckpointFormatError`), never quarantined:
upgrading jaxckpt reads it.
"""

from __future__ import annotations

import functools
import importlib.metadata
import json
import os
import sys
from typing import Any

from jaxckpt.checkpoint import storage
from jaxckpt.errors import CheckpointFormatError


@functools.cache  # a metadata lookup (~1 ms) on every save otherwise
def library_version() -> str:
    """The installed jaxckpt version (or the package's `__version__` when run from a source tree)."""
    try:
        return importlib.metadata.version("jaxckpt")
    except importlib.metadata.PackageNotFoundError:
        return str(getattr(sys.modules.get("jaxckpt"), "__version__", "unknown"))

FORMAT = 2
"""The format this release writes."""
READS = (1, 2)
"""The formats this release reads."""
CHECKSUMS = ("xxh3_64",)
"""Checksum algorithms this release checks; a step recording another is read without the check."""

INFO_FILE = ("jaxckpt", "metadata")
STATE_METADATA_FILE = ("state", "_METADATA")


def _json(path: storage.AnyPath) -> dict[str, Any]:
    """A JSON file of a step ({} if missing); an unparseable one raises (proof of damage)."""
    try:
        with path.open() as f:
            data = json.load(f)
    except FileNotFoundError:
        return {}
    except json.JSONDecodeError as e:  # the message names the file
        raise json.JSONDecodeError(f"{path} does not parse: {e.msg}", e.doc, e.pos) from None
    return data if isinstance(data, dict) else {}


def step_format(step_dir: os.PathLike | str) -> tuple[int, str]:
    """`(format, jaxckpt version)` a step records; (1, "unknown") for a step without a record."""
    step_dir = storage.run_path(step_dir)
    info = _json(step_dir.joinpath(*INFO_FILE))
    state = (_json(step_dir.joinpath(*STATE_METADATA_FILE)).get("custom_metadata") or {}).get("jaxckpt") or {}
    formats = [int(f) for f in (info.get("format"), state.get("format")) if isinstance(f, (int, float))]
    return max(formats, default=1), str(info.get("jaxckpt_version", "unknown"))


def check_readable(step_dir: os.PathLike | str) -> int:
    """The step's format, if this release reads it.

    Raises:
      CheckpointFormatError: if a newer jaxckpt wrote the step ("upgrade jaxckpt").
    """
    number, version = step_format(step_dir)
    if number > FORMAT:
        raise CheckpointFormatError(
            f"Step {storage.run_path(step_dir).name} at {step_dir} was written by jaxckpt {version} (format {number}); "
            f"this jaxckpt {library_version()} reads formats {READS[0]} to {READS[-1]}: upgrade jaxckpt to read it.")
    return number


def recorded_best(directory: os.PathLike | str, best_mode: str = "min") -> tuple[str | None, str]:
    """`(best_metric, best_mode)` the newest step of `directory` records (format 2 on); else (None, best_mode).

    So a reader (`checkpoint.resume_file`, `inspect`) ranks steps as the run that saved them did.
    """
    directory = storage.run_path(directory)
    steps = sorted((int(p.name) for p in directory.iterdir() if p.name.isdigit()), reverse=True)
    for step in steps:
        try:
            info = _json(directory / str(step) / INFO_FILE[0] / INFO_FILE[1])
        except (OSError, ValueError):  # a record that cannot be read ranks nothing
            continue
        if info.get("best_metric"):
            return str(info["best_metric"]), str(info.get("best_mode", best_mode))
    return None, best_mode
