"""One step directory on disk: its items, metadata, JSON records, and reading and checking its state.

Readers here never need a `CheckpointManager`: `pretrained`, the CLI and the manager share them.
See `jaxckpt.checkpoint` for the layout of a step directory.
"""

from __future__ import annotations

import os
import shutil
from typing import Any, Mapping

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from jaxckpt.checkpoint import formats, integrity, orbax_s3, shard_checksums, state_item, state_read, storage, writers
from jaxckpt.errors import ChecksumMismatch
from jaxckpt.tree import treepath
from jaxckpt.types import PyTree

STATE_ITEM = "state"
EXTRA_ITEM = "extra"
INFO_ITEM = "jaxckpt"
CORRUPT_DIR = "corrupt"


def read_state_metadata(step_dir: os.PathLike | str) -> dict[str, jax.ShapeDtypeStruct]:
    """Shapes and dtypes of a step's saved state, without reading any array.

    Args:
      step_dir: a step directory (holding `state/`).

    Returns:
      `{"params/dense/kernel": jax.ShapeDtypeStruct(shape, dtype), ...}`, paths relative to the state.

    Raises:
      CheckpointCorruptError: if the state's metadata is missing or does not parse.
      CheckpointReadError: if it cannot be read for another reason (nothing proves damage).
      CheckpointFormatError: if a newer jaxckpt wrote the step.
    """
    def read() -> dict[str, jax.ShapeDtypeStruct]:
        formats.check_readable(step_dir)
        arrays = state_read.layout_arrays(storage.run_path(step_dir) / STATE_ITEM)
        if arrays is not None:  # recorded in _METADATA: no tensorstore open per array
            return {p: jax.ShapeDtypeStruct(tuple(shape), state_item.dtype_of(dtype))
                    for p, (_, dtype, shape) in arrays.items()}
        tree = _orbax_tree_metadata(step_dir)
        return {p: jax.ShapeDtypeStruct(tuple(m.shape), np.dtype(m.dtype)) for p, m in treepath.flatten(tree).items()}

    return integrity.read_step(step_dir, read, what="the array metadata")


def saved_checksums(step_dir: os.PathLike | str) -> dict[str, list]:
    """`{path: [xxh3_64, dtype, shape]}` recorded when the step was saved.

    {} if none was, or if they were computed by an algorithm this release does not check (CRC-32C in
    builds before 0.1.0): such a step is read without the check, never taken for corrupt.
    """
    return state_read.checkable(state_read.read_custom_metadata(storage.run_path(step_dir) / STATE_ITEM))


def _orbax_tree_metadata(step_dir: os.PathLike | str) -> PyTree:
    item = storage.run_path(step_dir) / STATE_ITEM
    with orbax_s3.for_path(item):
        return ocp.PyTreeCheckpointHandler().metadata(epath.Path(item)).tree



def saved_shard_checksums(step_dir: os.PathLike | str) -> dict[str, dict[str, Any]]:
    """Per-shard hashes of arrays that were sharded over processes (see `jaxckpt.checkpoint.shard_checksums`)."""
    record = state_read.read_custom_metadata(storage.run_path(step_dir) / STATE_ITEM).get(state_item.CUSTOM_KEY) or {}
    return record.get("shards", {}) if record.get("checksum") == state_item.CHECKSUM else {}


def state_tree_metadata(step_dir: os.PathLike | str) -> PyTree:
    """Orbax's metadata tree of a step's state (nested dicts of `ArrayMetadata`).

    Raises:
      CheckpointCorruptError: if the metadata is missing or does not parse.
      CheckpointReadError: if it cannot be read for another reason.
    """
    return integrity.read_step(step_dir, lambda: _orbax_tree_metadata(step_dir), what="the array metadata")


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



def move_aside(directory: storage.AnyPath, step: int) -> storage.AnyPath:
    """Moves `directory/<step>` to `directory/corrupt/<step>` (`<step>.1`, ... if taken); returns the new path.

    On an object store there is no rename: the step's objects are copied, then its commit marker
    is deleted first (so Orbax no longer takes it for a step), then the rest. A kill half-way
    leaves the step where it was, or uncommitted beside a full copy; never only half of it.
    """
    aside = directory / CORRUPT_DIR
    aside.mkdir(exist_ok=True)
    dest, n = aside / str(step), 1
    while dest.exists():
        dest, n = aside / f"{step}.{n}", n + 1
    source = directory / str(int(step))
    if not storage.is_url(directory):
        shutil.move(source, dest)
        return dest
    for f in storage.files_under(source):
        (dest / str(f)[len(str(source)) + 1:]).write_bytes(f.read_bytes())
    (source / writers.COMMIT_FILE).unlink(missing_ok=True)
    source.rmtree(missing_ok=True)
    return dest


def _readable_fast(item_dir: storage.AnyPath) -> bool:
    """Whether `state_read.read_arrays` may read an item (it wrote it, and one process reads)."""
    return state_read.layout_arrays(item_dir) is not None and jax.process_count() == 1


def _on_a_device(leaf: Any) -> Any:
    """Abstract leaf saying where a restored array goes: the target's sharding, else device 0."""
    if isinstance(leaf, jax.ShapeDtypeStruct):
        if leaf.sharding is None:
            device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
            return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=device)
        return leaf
    if isinstance(leaf, jax.Array):
        return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=leaf.sharding)
    return leaf


def read_state(step_dir: os.PathLike | str, target: PyTree, *, verify: bool = True) -> PyTree:
    """A step's state as nested dicts shaped like `target`, each array on the target's sharding.

    Args:
      step_dir: a step directory (holding `state/`).
      target: nested dicts (a `flax.serialization.to_state_dict` of the state) of arrays or
        `jax.ShapeDtypeStruct`s; their shardings say where each array goes (device 0 if none).
      verify: check every array against the checksum recorded at save time.

    Returns:
      The restored nested dicts.

    Raises:
      ValueError: if the target's paths or shapes differ from the saved ones (one message listing all).
      CheckpointCorruptError: if the step is proven damaged (a checksum, a chunk's size, a missing file).
      CheckpointReadError: if the arrays cannot be read for another reason (EMFILE, EIO, ENOMEM, ...).
      CheckpointFormatError: if a newer jaxckpt wrote the step.
    """
    step_dir = storage.run_path(step_dir)
    item = step_dir / STATE_ITEM
    _check_structure(treepath.flatten(target), read_state_metadata(step_dir), step_dir)
    abstract = jax.tree.map(_on_a_device, target)

    def read() -> PyTree:
        if _readable_fast(item):
            wanted = {p: (x.dtype, x.sharding) for p, x in treepath.flatten(abstract).items()}
            return treepath.unflatten(state_read.read_arrays(item, wanted, check=verify), abstract)
        restore_args = ocp.checkpoint_utils.construct_restore_args(abstract)
        with orbax_s3.for_path(item):
            restored = ocp.PyTreeCheckpointHandler().restore(
                epath.Path(item), args=ocp.args.PyTreeRestore(abstract, restore_args=restore_args))
        if verify:
            _verify_flat(step_dir, treepath.flatten(restored))
        return restored

    return integrity.read_step(step_dir, read)


def verify_state(step_dir: os.PathLike | str) -> None:
    """Reads every array of a step (as numpy) and checks it against its saved checksum.

    Raises:
      CheckpointCorruptError: naming the step directory, if it is proven damaged.
      CheckpointReadError: if it cannot be read for a reason that proves nothing (EMFILE, EIO, ...).
      CheckpointFormatError: if a newer jaxckpt wrote the step.
    """
    step_dir = storage.run_path(step_dir)
    item = step_dir / STATE_ITEM

    def read() -> None:
        formats.check_readable(step_dir)
        if _readable_fast(item):
            state_read.read_arrays(item, {p: (None, None) for p in state_read.layout_arrays(item)}, check=True,
                                   keep=False)
            return
        tree = _orbax_tree_metadata(step_dir)
        as_numpy = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
        with orbax_s3.for_path(item):
            restored = treepath.flatten(ocp.PyTreeCheckpointHandler().restore(
                epath.Path(item), args=ocp.args.PyTreeRestore(restore_args=as_numpy)))
        _verify_flat(step_dir, restored)

    integrity.read_step(step_dir, read)


def _verify_flat(step_dir: storage.AnyPath, flat: Mapping[str, Any]) -> None:
    bad = state_read.mismatched_checksums(saved_checksums(step_dir), flat)
    bad += shard_checksums.mismatched(saved_shard_checksums(step_dir), flat)
    if bad:
        raise ChecksumMismatch(bad)


def _check_structure(
    target: Mapping[str, Any], saved: Mapping[str, jax.ShapeDtypeStruct], step_dir: storage.AnyPath
) -> None:
    """Raises one error listing every path/shape difference between a restore target and a step."""
    missing = sorted(set(target) - set(saved))
    unexpected = sorted(set(saved) - set(target))
    shapes = [
        f"{p}: saved {saved[p].shape}, target {tuple(np.shape(target[p]))}"
        for p in sorted(set(target) & set(saved))
        if tuple(np.shape(target[p])) != tuple(saved[p].shape)
    ]
    if not (missing or unexpected or shapes):
        return
    lines = [f"The restore target does not match the state saved in {step_dir}:"]
    for title, items in (
        ("in the target but not saved", missing),
        ("saved but not in the target", unexpected),
        ("shape differs", shapes),
    ):
        if items:
            lines.append(f"  {title} ({len(items)}): " + ", ".join(items[:10]) + (", ..." if len(items) > 10 else ""))
    lines.append(
        "Build the target the same way as the saved state (same model and optimizer), or load the "
        "weights alone with jaxckpt.weights.pretrained.load_params."
    )
    raise ValueError("\n".join(lines))
