"""Reading the `state` item back: its custom metadata, the checksums to check, and its arrays.

`read_arrays` reads an item `jaxckpt.checkpoint.state_item` wrote (the one-chunk layout) with one
batch of key reads, a bounded amount ahead, checking each array's bytes against the XXH3 hash
recorded at save time. Items in another layout (Orbax's own handler, several processes) are read
by Orbax; `mismatched_checksums` then checks what it restored against the same record.
"""

from __future__ import annotations

import json
import os
from typing import Any, Mapping

import jax
import numpy as np
import tensorstore as ts

from jaxckpt.checkpoint import state_item, storage
from jaxckpt.errors import ChecksumMismatch, ChunkSizeMismatch

# How many bytes of arrays a restore reads ahead of the one it places on devices: enough to keep
# the disk busy, small beside a large state (restore's peak host memory is the state plus this).
_READ_AHEAD_BYTES = 32 << 20
# ... or an eighth of what is read, up to this: at 1 GiB of 64 MiB arrays, two reads in flight
# instead of one read 1.5x faster here (benchmarks/README.md), for 1.125x the state at most.
_READ_AHEAD_MAX_BYTES = 128 << 20


def read_custom_metadata(item_dir: os.PathLike | str) -> dict[str, Any]:
    """`_METADATA["custom_metadata"]` of an item ({} if there is no `_METADATA`).

    Raises:
      json.JSONDecodeError: if `_METADATA` does not parse (proof of damage, see `integrity`).
      OSError: if it cannot be read (which proves nothing: the caller classifies it).
    """
    path = storage.run_path(item_dir) / state_item.METADATA_FILE
    try:
        with path.open() as f:
            return json.load(f).get("custom_metadata") or {}
    except FileNotFoundError:
        return {}
    except json.JSONDecodeError as e:  # the message names the file
        raise json.JSONDecodeError(f"{path} does not parse: {e.msg}", e.doc, e.pos) from None


def checkable(custom_metadata: Mapping[str, Any]) -> dict[str, list]:
    """The recorded `{path: [hash, dtype, shape]}` if this release knows their algorithm, else {}."""
    record = custom_metadata.get(state_item.CUSTOM_KEY) or {}
    return record.get("arrays", {}) if record.get("checksum") == state_item.CHECKSUM else {}


def layout_arrays(item_dir: os.PathLike | str) -> dict[str, list] | None:
    """`{path: [hash, dtype, shape]}` of an item this module wrote; None for any other item."""
    record = read_custom_metadata(item_dir).get(state_item.CUSTOM_KEY) or {}
    return record.get("arrays") if record.get("layout") == state_item.LAYOUT else None


def read_arrays(item_dir: os.PathLike | str, wanted: Mapping[str, tuple[Any, Any]], *,
                check: bool = False, keep: bool = True) -> dict[str, Any]:
    """Reads arrays of an item this module wrote, each cast to a dtype and put on a sharding.

    Args:
      item_dir: the item directory.
      wanted: `{path: (dtype or None, sharding or None)}`; None dtype keeps the saved one, None
        sharding returns numpy.
      check: compare each array's bytes with its recorded hash (while the other reads are in
        flight).
      keep: return the arrays; False only checks them (`verify`), holding one at a time.

    Returns:
      `{path: array}`.

    Raises:
      KeyError: if a path is not an array of the item.
      ChunkSizeMismatch: if a stored chunk has the wrong size (a damaged file).
      ChecksumMismatch: with `check`, naming every array whose bytes changed. Hashes of an
        algorithm this release does not know (CRC-32C before 0.1.0) are not checked.
    """
    item_dir = storage.run_path(item_dir)
    custom = read_custom_metadata(item_dir)
    arrays = layout_arrays(item_dir)
    if arrays is None:
        raise ValueError(f"{item_dir} was not written by jaxckpt.state_item; read it with Orbax.")
    check = check and bool(checkable(custom))
    context = ts.Context({"file_io_concurrency": {"limit": 128}})
    kvstore = ts.KvStore.open(state_item.item_kvstore_spec(item_dir), context=context).result()

    def start(path: str) -> tuple[Any, Any]:
        _, dtype, shape = arrays[path]
        name, dtype = path.replace("/", "."), state_item.dtype_of(dtype)
        if int(np.prod(shape, dtype=np.int64)) * dtype.itemsize <= state_item.DIRECT_BYTES:
            return kvstore.read(state_item.chunk_key(name, len(shape))), None
        kvstore_spec = {**state_item.item_kvstore_spec(item_dir), "path": name + "/"}
        spec = {"driver": "zarr", "kvstore": kvstore_spec, "open": True}
        # Straight into an aligned buffer of our own: on CPU, `jax.device_put` then uses it
        # without a copy, so a large array is held once, plus tensorstore's read buffer meanwhile.
        into = _aligned_empty(tuple(shape), dtype)
        source = ts.open(spec, context=context, read=True).result()
        return ts.array(into, copy=False, write=True).write(source), into

    # Reads go on in tensorstore's threads ahead of this loop, up to a bounded number of bytes, so
    # host memory stays near the restored state itself however large it is.
    out, bad, failed, queue, in_flight = {}, [], {}, list(wanted), {}
    budget, limit = 0, _read_ahead(sum(_nbytes(arrays[p]) for p in wanted if p in arrays))
    for path in wanted:
        while queue and (not in_flight or budget + _nbytes(arrays[queue[0]]) <= limit):
            budget += _nbytes(arrays[queue[0]])
            try:
                in_flight[queue[0]] = start(queue[0])
            except Exception as e:  # noqa: BLE001 (an open that failed: reported with the reads below)
                in_flight[queue[0]] = (e, None)
            queue.pop(0)
        pending, into = in_flight.pop(path)
        budget -= _nbytes(arrays[path])
        crc, dtype, shape = arrays[path]
        try:
            if isinstance(pending, Exception):
                raise pending
            result = pending.result()
            stored = into if into is not None else _as_array(path, result, state_item.dtype_of(dtype), tuple(shape))
        except Exception as e:  # noqa: BLE001 (re-raised below, naming every array that failed)
            if not check:
                raise
            failed[path] = e
            continue
        finally:
            del pending, into
        if check and state_item.xxh3(stored) != crc:
            bad.append(path)
        cast, sharding = wanted[path]
        if cast is not None and np.dtype(cast) != stored.dtype:
            stored = stored.astype(cast)
        if keep:
            out[path] = stored if sharding is None else jax.device_put(stored, sharding)
        del stored
    if failed:  # the first error decides what it means (see `integrity`); the message names them all
        first = next(iter(failed.values()))
        names = ", ".join(list(failed)[:5]) + (", ..." if len(failed) > 5 else "")
        try:
            named = type(first)(f"{len(failed)} array(s) could not be read ({names}): {first}")
        except Exception:  # noqa: BLE001 (a type that takes other arguments: raise it as it is)
            raise first from None
        raise named from first
    if bad:
        raise ChecksumMismatch(bad)
    return out


def _read_ahead(total: int) -> int:
    """Bytes read ahead of the array being placed: an eighth of `total`, within the two bounds above."""
    return min(max(_READ_AHEAD_BYTES, total // 8), _READ_AHEAD_MAX_BYTES)


def _nbytes(record: list) -> int:
    _, dtype, shape = record
    return int(np.prod(shape, dtype=np.int64)) * state_item.dtype_of(dtype).itemsize


def _aligned_empty(shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    """An uninitialised C-order array whose data starts on a 64-byte boundary (XLA's CPU alignment)."""
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    raw = np.empty(nbytes + 64, np.uint8)
    offset = (-raw.ctypes.data) % 64
    return raw[offset:offset + nbytes].view(dtype).reshape(shape)


def _as_array(path: str, result: Any, dtype: np.dtype, shape: tuple[int, ...]) -> np.ndarray:
    """A read's result as a writable array: zarr reads are arrays, key reads are bytes."""
    if isinstance(result, np.ndarray):
        return result
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if result.state != "value" or len(result.value) != expected:
        size = len(result.value) if result.state == "value" else 0
        raise ChunkSizeMismatch(f"the stored chunk of {path} holds {size} bytes, expected {expected}")
    return np.frombuffer(bytearray(result.value), dtype).reshape(shape)


def mismatched_checksums(saved: Mapping[str, list], flat: Mapping[str, Any]) -> list[str]:
    """Paths whose restored bytes differ from the saved checksum (same dtype and shape only)."""
    restored = state_item.checksums({p: v for p, v in flat.items() if p in saved})
    return [
        p
        for p, (crc, dtype, shape) in saved.items()
        if p in restored and restored[p][1:] == [dtype, shape] and restored[p][0] != crc
    ]
