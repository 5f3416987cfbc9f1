"""One step directory on disk: its items, metadata, JSON records and array checksums.

Readers here never need a `CheckpointManager`: `pretrained`, the CLI and the manager share them.
See `jaxckpt.checkpoint` for the layout of a step directory.
"""

from __future__ import annotations

import importlib.metadata
import os
import pathlib
import sys
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from jaxckpt import treepath
from jaxckpt import state_item
from jaxckpt.types import PyTree

STATE_ITEM = "state"
EXTRA_ITEM = "extra"
INFO_ITEM = "jaxckpt"
CORRUPT_DIR = "corrupt"


class CheckpointNotFoundError(FileNotFoundError):
    """No checkpoint where one was asked for (an empty directory, a missing step, no best step)."""


class CheckpointCorruptError(RuntimeError):
    """A step directory whose arrays cannot be read or do not match their saved checksums."""

    def __init__(self, message: str, step_dir: os.PathLike | str):
        super().__init__(message)
        self.step_dir = pathlib.Path(step_dir)


class CheckpointSaveError(RuntimeError):
    """A save failed (e.g. the disk is full); earlier checkpoints are left as they were."""


def library_version() -> str:
    """The installed jaxckpt version (or the package's `__version__` when run from a source tree)."""
    try:
        return importlib.metadata.version("jaxckpt")
    except importlib.metadata.PackageNotFoundError:
        return str(getattr(sys.modules.get("jaxckpt"), "__version__", "unknown"))


def read_state_metadata(step_dir: os.PathLike | str) -> dict[str, jax.ShapeDtypeStruct]:
    """Shapes and dtypes of a step's saved state, without reading any array.

    Args:
      step_dir: a step directory (holding `state/`).

    Returns:
      `{"params/dense/kernel": jax.ShapeDtypeStruct(shape, dtype), ...}`, paths relative to the state.

    Raises:
      CheckpointCorruptError: if the state's metadata is missing or unreadable.
    """
    arrays = state_item.layout_arrays(pathlib.Path(step_dir) / STATE_ITEM)
    if arrays is not None:  # recorded in _METADATA: no tensorstore open per array
        return {p: jax.ShapeDtypeStruct(tuple(shape), state_item.dtype_of(dtype)) for p, (_, dtype, shape) in arrays.items()}
    tree = state_tree_metadata(step_dir)
    return {p: jax.ShapeDtypeStruct(tuple(m.shape), np.dtype(m.dtype)) for p, m in treepath.flatten(tree).items()}


def saved_checksums(step_dir: os.PathLike | str) -> dict[str, list]:
    """`{path: [crc32c, dtype, shape]}` recorded when the step was saved ({} if none was)."""
    record = state_item.read_custom_metadata(pathlib.Path(step_dir) / STATE_ITEM).get(state_item.CUSTOM_KEY) or {}
    return record.get("arrays", {}) if record.get("checksum") == state_item.CHECKSUM else {}


def state_tree_metadata(step_dir: os.PathLike | str) -> PyTree:
    """Orbax's metadata tree of a step's state (nested dicts of `ArrayMetadata`)."""
    path = pathlib.Path(step_dir) / STATE_ITEM
    try:
        return ocp.PyTreeCheckpointHandler().metadata(epath.Path(path)).tree
    except Exception as e:
        raise CheckpointCorruptError(
            f"Cannot read the array metadata of {path}: {type(e).__name__}: {e}. The step directory is "
            "incomplete or damaged; restore another step.",
            step_dir,
        ) from e


def read_json_item(step_dir: os.PathLike | str, item: str) -> dict[str, Any] | None:
    """A step's JSON item (`extra`, `jaxckpt` or `metrics`), or None if the step has none."""
    path = epath.Path(step_dir) / item
    if not path.exists():
        return None
    handler = ocp.JsonCheckpointHandler(filename="metrics") if item == "metrics" else ocp.JsonCheckpointHandler()
    try:
        return handler.restore(path)
    except FileNotFoundError:
        return None
