"""Checksums of arrays sharded over several processes: every shard hashed by the process that owns it.

In a multi-process save Orbax writes each shard from the process that owns it (replica 0 of each
slice); no process holds a whole array, and gathering one to hash it would cost more than the
save. So each process hashes its own shards and one host allgather of the digests (a few bytes per
shard) gives process 0 the record it writes into the state item's `_METADATA`:
`custom_metadata["jaxckpt"]["shards"] = {path: {"index", "xxh3_64", "dtype", "shape"}}`.
Readers that do not know this key ignore it.
"""

from __future__ import annotations

from typing import Any, Mapping

import jax
import numpy as np
import xxhash


def _xxh3(array: np.ndarray) -> str:
    """XXH3-64 of an array's bytes as 16 hex digits (as `state_item` hashes whole arrays)."""
    return xxhash.xxh3_64_hexdigest(np.ascontiguousarray(array).reshape(-1).view(np.uint8))


def _sharded_over_processes(leaf: Any) -> bool:
    return isinstance(leaf, jax.Array) and not leaf.is_fully_addressable and not leaf.sharding.is_fully_replicated


def _index_key(index: tuple[slice, ...], shape: tuple[int, ...]) -> tuple[tuple[int, int], ...]:
    return tuple((s.start or 0, n if s.stop is None else s.stop) for s, n in zip(index, shape))


def record(flat: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """XXH3-64 of every shard of the arrays sharded over several processes, gathered on every process.

    Each process hashes the shards it owns (replica 0 of each slice, the ones Orbax writes from this
    process), then one host allgather shares them, so the record process 0 writes covers every
    shard of every array without moving any array between hosts. Every process must call this at
    the same point (a save does).

    Returns:
      `{path: {"index": [[[start, stop], ...per dim], ...], "xxh3_64": [hex, ...], "dtype", "shape"}}`;
      {} when no array is sharded over processes (then `checksums` covers everything).
    """
    sharded = {p: leaf for p, leaf in flat.items() if _sharded_over_processes(leaf)}
    if not sharded:
        return {}
    from jax.experimental import multihost_utils

    slots, mine = [], []  # (path, index) in one global order; [owned, hi, lo] per slot
    for path, leaf in sharded.items():
        shape = tuple(leaf.shape)
        indices = sorted({_index_key(i, shape) for i in leaf.sharding.devices_indices_map(shape).values()})
        owned = {_index_key(s.index, shape): s.data for s in leaf.addressable_shards if s.replica_id == 0}
        for key in indices:
            slots.append((path, key))
            digest = int(_xxh3(np.asarray(owned[key])), 16) if key in owned else 0
            mine.append([int(key in owned), digest >> 32, digest & 0xFFFFFFFF])
    everyone = np.asarray(multihost_utils.process_allgather(np.asarray(mine, np.uint32)))
    everyone = everyone.reshape(-1, len(slots), 3)
    out: dict[str, dict[str, Any]] = {}
    for n, (path, key) in enumerate(slots):
        owner = int(np.argmax(everyone[:, n, 0]))
        _, hi, lo = (int(v) for v in everyone[owner, n])
        leaf = sharded[path]
        record = out.setdefault(path, {"index": [], "xxh3_64": [], "dtype": np.dtype(leaf.dtype).name,
                                       "shape": list(leaf.shape)})
        record["index"].append([list(k) for k in key])
        record["xxh3_64"].append(f"{(hi << 32) | lo:016x}")
    return out


def mismatched(saved: Mapping[str, dict[str, Any]], flat: Mapping[str, Any]) -> list[str]:
    """Paths with a shard whose bytes differ from its `record`.

    A host array is checked slice by slice; a restored jax array through the shards this process
    owns whose slice was recorded (a restore onto another mesh checks the slices that coincide;
    `verify` reads host arrays and checks them all).
    """
    bad = []
    for path, record in saved.items():
        leaf = flat.get(path)
        if leaf is None or list(np.shape(leaf)) != record["shape"] or np.dtype(leaf.dtype).name != record["dtype"]:
            continue
        expected = {tuple(tuple(d) for d in index): crc for index, crc in zip(record["index"], record["xxh3_64"])}
        if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
            shape = tuple(leaf.shape)
            pieces = [(_index_key(s.index, shape), s.data) for s in leaf.addressable_shards if s.replica_id == 0]
        else:
            host = np.asarray(leaf)
            pieces = [(key, host[tuple(slice(a, b) for a, b in key)]) for key in expected]
        if any(key in expected and _xxh3(np.asarray(data)) != expected[key] for key, data in pieces):
            bad.append(path)
    return bad
