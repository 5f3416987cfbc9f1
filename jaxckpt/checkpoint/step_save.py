"""Writing one step through Orbax: its items and their handlers, checked inputs, and a failed save's cleanup.

`CheckpointManager.save` builds a step from these: the `state` item (`jaxckpt.checkpoint.state_item`),
the caller's `extra` and the library's record as JSON items, and the metrics Orbax writes for
retention. When a save fails, its partial directory is removed and the error says which earlier
steps are intact and, for a full disk, what to do.
"""

from __future__ import annotations

import datetime
import errno
import json
import time
from typing import Any, Mapping

import jax
import numpy as np
import orbax.checkpoint as ocp

from jaxckpt.checkpoint import formats, integrity, state_item, storage, writers
from jaxckpt.checkpoint.retention import RetentionPolicy
from jaxckpt.checkpoint.stepdir import EXTRA_ITEM, INFO_ITEM, STATE_ITEM
from jaxckpt.errors import CheckpointSaveError
from jaxckpt.types import PyTree

_SETTLE_SECONDS = 10.0


def item_handlers(fast: bool) -> dict[str, ocp.CheckpointHandler]:
    """The Orbax handler of each item of a step; `fast`: the state goes through `state_item.write`."""
    return {
        # Plain Orbax's PyTree format without zstd (trained float weights shrink by <10% under
        # it, while compressing cost more than the disk write), written in one transaction.
        # Never copies: an async save hands it a snapshot, and several processes go through Orbax.
        STATE_ITEM: state_item.StateItemHandler(copy_arrays=False, fast=fast),
        EXTRA_ITEM: ocp.JsonCheckpointHandler(),
        INFO_ITEM: ocp.JsonCheckpointHandler(),
    }


def step_args(tree: PyTree, extra: Mapping[str, Any] | None, info: Mapping[str, Any]) -> ocp.args.Composite:
    """Orbax's save args of a step: the state tree, the caller's `extra` and the library's record.

    Raises:
      TypeError: if `extra` is not JSON-serialisable.
    """
    return ocp.args.Composite(
        **{
            STATE_ITEM: state_item.StateSave(tree),
            EXTRA_ITEM: ocp.args.JsonSave(_json_ready(extra, "extra")),
            INFO_ITEM: ocp.args.JsonSave(dict(info)),
        }
    )


def info_record(writer: str, policy: RetentionPolicy) -> dict[str, Any]:
    """The library's record of a step (`jaxckpt/metadata`): versions, save time, writer and best rule."""
    return {
        "format": formats.FORMAT,
        "jaxckpt_version": formats.library_version(),
        "jax_version": jax.__version__,
        "orbax_version": ocp.__version__,
        "saved_at": datetime.datetime.now(datetime.timezone.utc).isoformat(),
        "writer": writer,
        "best_metric": policy.best_metric,
        "best_mode": policy.best_mode,
    }


def _json_ready(value: Mapping[str, Any] | None, what: str) -> dict[str, Any]:
    value = dict(value or {})
    try:
        json.dumps(value)
    except (TypeError, ValueError) as e:
        raise TypeError(
            f"{what} must be JSON-serialisable (str, numbers, bools, lists, dicts): {e}. Convert arrays "
            "with .tolist() or float() before saving."
        ) from e
    return value


def metrics_ready(metrics: Mapping[str, Any] | None) -> dict[str, float]:
    """`metrics` as `{name: float}`, as Orbax's metrics item holds them.

    Raises:
      TypeError: naming the metric that is not a scalar number.
    """
    out = {}
    for name, value in (metrics or {}).items():
        try:
            out[str(name)] = float(np.asarray(value))
        except (TypeError, ValueError) as e:
            raise TypeError(f"metrics[{name!r}] must be a scalar number, got {type(value).__name__}: {e}") from e
    return out


def _is_disk_full(exc: BaseException) -> bool:
    return any((isinstance(e, OSError) and e.errno == errno.ENOSPC) or "No space left on device" in str(e)
               for e in integrity.exception_chain(exc))


def save_error(directory: storage.AnyPath, step: int | None, kept: list[int], exc: BaseException) -> CheckpointSaveError:
    """The error of a failed save of `step` (None: unknown) to `directory`, where `kept` steps remain."""
    where = f"step {step} to {directory / str(step)}" if step is not None else f"to {directory}"
    if _is_disk_full(exc):
        reason = "the disk is full (No space left on device). Free space on that disk or save to another directory"
    else:
        reason = f"{type(exc).__name__}: {exc}"
    return CheckpointSaveError(
        f"Saving {where} failed: {reason}. Earlier checkpoints {sorted(kept)} in {directory} are intact."
    )


def remove_failed_save(directory: storage.AnyPath, step: int) -> None:
    """Removes a failed save's partial directory once the writes still in flight have stopped.

    Orbax raises at the first failed item while other items' writes may still be landing (and
    recreating directories), so we remove until the directory stays gone for a few polls.
    """
    if jax.process_index() != 0:
        return
    quiet, deadline = 0, time.monotonic() + _SETTLE_SECONDS
    while quiet < 3 and time.monotonic() < deadline:
        leftovers = writers.unfinished_saves(directory, step)
        for leftover in leftovers:
            writers.remove(leftover)
        quiet = 0 if leftovers else quiet + 1
        time.sleep(0.05)
