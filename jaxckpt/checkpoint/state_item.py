"""The `state` item of a step: Orbax's PyTree format, written and read in one tensorstore transaction.

Why not Orbax's own `PyTreeCheckpointHandler`: it opens one tensorstore zarr array per leaf
through several layers of asyncio, a fixed ~1.5 ms per leaf on a 2-core CPU, so a state of 4096
small leaves took about 6 s to save and restore. Here every leaf is two key-value writes (its
zarr `.zarray` and its one chunk) into one OCDBT database in one transaction, and a read is one
batch of key reads: the same state takes a fraction of a second (`benchmarks/small_leaves.py`).

What lands on disk is what `ocp.PyTreeCheckpointHandler(use_compression=False)` writes for one
process: `_METADATA` (the tree), `_sharding`, and an OCDBT database (`manifest.ocdbt`, `d/`)
holding each leaf as a zarr v2 array named by its keys joined with `.` (`params.enc.kernel/`).
Plain Orbax reads it with no jaxckpt import (tests/state_item_test.py compares both writers'
output key by key). Two differences, both invisible to Orbax readers: every array is one chunk,
and `_METADATA["custom_metadata"]["jaxckpt"]` holds each array's dtype, shape and XXH3 hash, which
is how `jaxckpt.checkpoint.state_read` finds and checks an array without asking tensorstore.
This module writes the item (and names its files for the reader); `state_read` reads it back.

Where this writer does not apply (several processes, arrays not fully addressable from this
one, leaves other than arrays / None / empty dicts, keys with `.` or `/`, zero-size arrays,
dtypes zarr v2 cannot name), saving and reading go through Orbax's handler unchanged, with the
checksums in the same place. That is the path of model-sharded state over several processes:
Orbax writes from each process only the shards it owns (replica 0 of each slice), and
`jaxckpt.checkpoint.shard_checksums` records a hash of every shard (`custom_metadata["jaxckpt"]["shards"]`), each
computed by its owner. In one process a sharded array is fully addressable and this writer
saves it as one chunk; any mesh, device or process count restores it through target shardings.
"""

from __future__ import annotations

import base64
import dataclasses
import functools
import json
import os
import re
from typing import Any, Iterator, Mapping

import jax
import ml_dtypes
import numpy as np
import orbax.checkpoint as ocp
import tensorstore as ts
import xxhash
from etils import epath

from jaxckpt.checkpoint import shard_checksums, storage
from jaxckpt.checkpoint.formats import FORMAT
from jaxckpt.tree import treepath
from jaxckpt.types import PyTree

LAYOUT = "one-chunk-v1"
"""Marker in `_METADATA["custom_metadata"]["jaxckpt"]["layout"]` of items this module wrote."""

CUSTOM_KEY = "jaxckpt"
CHECKSUM = "xxh3_64"
"""The checksum recorded for every array (`_METADATA["custom_metadata"]["jaxckpt"]["checksum"]`)."""
METADATA_FILE = "_METADATA"
_SHARDING_FILE = "_sharding"
# Arrays larger than this go through tensorstore's zarr driver, which writes from (and reads into)
# a numpy buffer; smaller ones are one key's bytes, which costs a copy but no per-array open.
DIRECT_BYTES = 1 << 20
_OCDBT_CONFIG = {"max_inline_value_bytes": 1024, "max_decoded_node_bytes": 100_000_000}
_ZARR_DTYPES = {np.dtype(ml_dtypes.bfloat16): "bfloat16"}


TESTED_ORBAX = ((0, 12, 8), (0, 13))
"""The orbax-checkpoint versions [low, high) the fast writer is tested with (it uses Orbax internals)."""
FAST_WRITER_ENV = "JAXCKPT_FAST_WRITER"
"""Set to 0 to save through Orbax's own PyTree handler (the same files, slower for many small leaves)."""


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", text)[:3])


@functools.cache
def _orbax_internals() -> tuple[Any, Any]:
    """Orbax's private future and sharding-metadata modules, which the fast writer needs."""
    from orbax.checkpoint._src.futures import future
    from orbax.checkpoint._src.metadata import sharding

    _ = future.CommitFutureAwaitingContractedSignals, sharding.from_jax_sharding  # fail here if renamed
    return future, sharding


def fast_writer_off() -> str | None:
    """Why saves go through Orbax's own handler instead of `write`, or None if `write` may be used.

    `write` relies on Orbax internals, so it is used only with the Orbax versions it is tested with
    and only if those internals import; `JAXCKPT_FAST_WRITER=0` turns it off.
    """
    if os.environ.get(FAST_WRITER_ENV, "1").strip() == "0":
        return f"{FAST_WRITER_ENV}=0"
    low, high = TESTED_ORBAX
    if not low <= _version(ocp.__version__) < high:
        return (f"orbax-checkpoint {ocp.__version__} is outside the range the fast writer is tested with "
                f"(>={'.'.join(map(str, low))},<{'.'.join(map(str, high))})")
    try:
        _orbax_internals()
    except (ImportError, AttributeError) as e:
        return f"Orbax internals it needs are gone ({type(e).__name__}: {e})"
    return None


def _zarr_dtype(dtype: np.dtype) -> str | None:
    """The zarr v2 name of `dtype` as tensorstore writes it, or None if it has none."""
    dtype = np.dtype(dtype)
    if dtype in _ZARR_DTYPES:
        return _ZARR_DTYPES[dtype]
    if dtype.kind in "biuf" and dtype.itemsize <= 8:
        return dtype.newbyteorder("<").str if dtype.itemsize > 1 else dtype.str
    return None


def dtype_of(name: str) -> np.dtype:
    """The numpy dtype of a zarr v2 dtype name (or a numpy dtype name)."""
    for dtype, zarr_name in _ZARR_DTYPES.items():
        if zarr_name == name:
            return dtype
    return np.dtype(name)


def _walk(tree: Any, keys: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], Any]]:
    """(keys, leaf) pairs of a nested dict; None and empty dicts are leaves, as Orbax sees them."""
    if isinstance(tree, Mapping) and tree:
        for key, value in tree.items():
            yield from _walk(value, keys + (key,))
    else:
        yield keys, tree


def _is_array(leaf: Any) -> bool:
    return isinstance(leaf, (jax.Array, np.ndarray))


@dataclasses.dataclass(frozen=True)
class HostArray:
    """A host copy of a jax array and the sharding it had, which `write` saves as that jax array.

    `snapshot` makes these so that a save can run on another thread while the caller goes on
    with (and donates) its arrays.
    """

    array: np.ndarray
    sharding: Any


def snapshot(tree: PyTree) -> PyTree:
    """`tree` (a tree `can_write` accepts) with every array replaced by a `HostArray` copy."""
    out: dict[str, Any] = {}
    for keys, (leaf, sharding) in to_host(tree, copy=True).items():
        node = out
        for key in keys[:-1]:
            node = node.setdefault(key, {})
        node[keys[-1]] = HostArray(leaf, sharding) if _is_array(leaf) else leaf
    return out


def can_write(tree: PyTree) -> bool:
    """Whether `write` supports `tree` (else Orbax's handler must save it)."""
    return unwritable(tree) is None


def unwritable(tree: PyTree) -> str | None:
    """Why `write` cannot save `tree` (then Orbax's handler does), or None if it can.

    Keys may hold `.` (optimizer labels like `x0.1` do): each array's name is its keys joined with
    `.`, as Orbax names them, so only two leaves whose joined names collide are refused.
    """
    if jax.process_count() != 1:
        return "several processes save it"
    if not isinstance(tree, Mapping):
        return f"the state is a {type(tree).__name__}, not nested dicts"
    names = set()
    for keys, leaf in _walk(tree):
        shown = "/".join(map(str, keys))
        if not keys or any(not isinstance(k, str) or not k or "/" in k for k in keys):
            return f"the key path {keys!r} holds an empty, non-string or '/' key"
        name = ".".join(keys)
        if name in names:
            return f"two leaves are both named {name!r} once their keys are joined with '.'"
        names.add(name)
        if leaf is None or (isinstance(leaf, Mapping) and not leaf):
            continue
        if isinstance(leaf, HostArray):
            leaf = leaf.array
        if not _is_array(leaf):
            return f"{shown} is a {type(leaf).__name__}, not an array"
        if 0 in np.shape(leaf) or _zarr_dtype(leaf.dtype) is None:
            return f"{shown} has zero size or a dtype ({leaf.dtype}) zarr v2 cannot name"
        if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
            return f"{shown} is not fully addressable from this process"
    return None


def to_host(tree: PyTree, *, copy: bool = True) -> dict[tuple[str, ...], Any]:
    """Host views of the arrays of `tree`, keyed by their key tuples: `{keys: (leaf, sharding)}`.

    Args:
      tree: a tree `can_write` accepts.
      copy: copy arrays that share memory with a device buffer (on CPU a jax array and its
        numpy view do), so the caller may donate or overwrite its arrays while a background
        write reads these. A synchronous save passes False.
    """
    flat = dict(_walk(tree))
    for leaf in flat.values():
        if isinstance(leaf, jax.Array):
            leaf.copy_to_host_async()
    host = {}
    for keys, leaf in flat.items():
        if isinstance(leaf, HostArray):
            host[keys] = (leaf.array, leaf.sharding)
        elif isinstance(leaf, jax.Array):
            array = np.asarray(leaf)
            if copy and any(d.platform == "cpu" for d in leaf.devices()):
                array = array.copy()
            host[keys] = (array, leaf.sharding)
        elif isinstance(leaf, np.ndarray):
            host[keys] = (np.array(leaf) if copy else leaf, None)
        else:
            host[keys] = (leaf, None)
    return host


def xxh3(array: np.ndarray) -> str:
    """XXH3-64 of an array's bytes, as 16 hex digits.

    ~14 GB/s on one core here, with the GIL released: 2.6x hardware CRC-32C and 6x zlib's crc32,
    which made checksums the largest cost of a large save. Like a CRC it catches any flipped byte.
    """
    return xxhash.xxh3_64_hexdigest(np.ascontiguousarray(array).reshape(-1).view(np.uint8))


def checksums(flat: Mapping[str, Any]) -> dict[str, list]:
    """XXH3-64 of each array's bytes, keyed by path: `{path: [xxh3_64, dtype, shape]}`.

    Arrays not fully addressable from this process are checked through a local copy when they are
    replicated (every process holds the whole value), and skipped when sharded over hosts:
    `jaxckpt.checkpoint.shard_checksums` hashes those shard by shard where they live, with no gather of the array.
    """
    out = {}
    for path, leaf in flat.items():
        if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
            if not leaf.sharding.is_fully_replicated:
                continue
            leaf = leaf.addressable_data(0)
        data = np.asarray(leaf)
        out[path] = [xxh3(data), data.dtype.name, list(data.shape)]
    return out



def item_kvstore_spec(item_dir: os.PathLike | str) -> dict[str, Any]:
    """The OCDBT kvstore of an item directory: local, `gs://` or `s3://` (`storage.kvstore_spec`)."""
    # One writer per item directory (a fresh one), so no lock files locally: tensorstore's default
    # writes each file under a lock and renames it into place, which cost ~60% of a 512 MiB save
    # here. Orbax opens its own databases the same way.
    return {"driver": "ocdbt", "base": storage.kvstore_spec(item_dir, single_writer=True), "config": _OCDBT_CONFIG}


def _zarray(array: np.ndarray) -> dict[str, Any]:
    shape = list(array.shape)
    return {"chunks": shape, "compressor": None, "dimension_separator": ".", "dtype": _zarr_dtype(array.dtype),
            "fill_value": None, "filters": None, "order": "C", "shape": shape, "zarr_format": 2}


def chunk_key(name: str, ndim: int) -> str:
    return f"{name}/{'.'.join('0' * ndim) or '0'}"


def _value_metadata(leaf: Any, sharding: Any) -> dict[str, Any]:
    if leaf is None:
        return {"value_type": "None", "skip_deserialize": True}
    if isinstance(leaf, Mapping):
        return {"value_type": "Dict", "skip_deserialize": True}
    if sharding is None:
        return {"value_type": "np.ndarray", "skip_deserialize": False}
    # The shape of each stored chunk: Orbax writes one per shard, this module one per array.
    return {"value_type": "jax.Array", "skip_deserialize": False, "write_shape": list(leaf.shape)}


def write(item_dir: os.PathLike | str, host: Mapping[tuple[str, ...], Any],
          custom_metadata: Mapping[str, Any] | None = None) -> None:
    """Writes host arrays (from `to_host`) as an Orbax PyTree item in `item_dir`; blocks until durable.

    Each array's hash is computed here while tensorstore's own threads write, so checking costs
    little time beside the disk.

    Args:
      item_dir: the item directory (created if needed); Orbax renames its parent on commit.
      host: `to_host(tree)`.
      custom_metadata: the caller's JSON-able custom metadata; the checksums are added to it.
    """
    item_dir = storage.run_path(item_dir)
    item_dir.mkdir(parents=True, exist_ok=True)  # (a no-op on an object store: keys need no folders)
    context = ts.Context({"file_io_concurrency": {"limit": 128}})
    kvstore = ts.KvStore.open(item_kvstore_spec(item_dir), context=context).result()
    txn = ts.Transaction(atomic=False)
    in_txn = kvstore.with_transaction(txn)
    pending, written, shardings, tree_metadata = [], {}, {}, {}
    for keys, (leaf, sharding) in host.items():
        name = ".".join(keys)
        tree_metadata[str(keys)] = {
            "key_metadata": [{"key": k, "key_type": 2} for k in keys],
            "value_metadata": _value_metadata(leaf, sharding),
        }
        if not _is_array(leaf):
            continue
        leaf = np.require(leaf, requirements="C")  # (ascontiguousarray would make 0-d arrays 1-d)
        written["/".join(keys)] = leaf
        if sharding is not None and (serialized := _orbax_internals()[1].from_jax_sharding(sharding)) is not None:
            shardings[base64.urlsafe_b64encode(name.encode()).decode()] = serialized.to_serialized_string()
        if leaf.nbytes > DIRECT_BYTES:
            spec = {"driver": "zarr", "kvstore": {**item_kvstore_spec(item_dir), "path": name + "/"},
                    "metadata": {k: v for k, v in _zarray(leaf).items() if k != "zarr_format"}, "create": True}
            store = ts.open(spec, context=context, transaction=txn).result()
            # No copy into tensorstore's buffers: nothing writes to `leaf` until the save is done
            # (a snapshot, or a synchronous caller that waits).
            pending.append(store.write(leaf, can_reference_source_data_indefinitely=True))
        else:
            pending.append(in_txn.write(f"{name}/.zarray", json.dumps(_zarray(leaf), separators=(",", ":"))))
            pending.append(in_txn.write(chunk_key(name, leaf.ndim), leaf.tobytes()))
    # While tensorstore's threads write, this one checksums.
    arrays = {path: [xxh3(leaf), leaf.dtype.name, list(leaf.shape)] for path, leaf in written.items()}
    for f in pending:
        f.result()
    txn.commit_async().result()
    custom = dict(custom_metadata or {})
    custom[CUSTOM_KEY] = {**custom.get(CUSTOM_KEY, {}), "format": FORMAT, "layout": LAYOUT, "checksum": CHECKSUM,
                          "arrays": arrays}
    _write_json(item_dir / _SHARDING_FILE, shardings)
    _write_json(item_dir / METADATA_FILE, {
        "tree_metadata": tree_metadata, "use_ocdbt": True, "use_zarr3": False,
        "store_array_data_equal_to_fill_value": True, "custom_metadata": custom,
    })


def _write_json(path: storage.AnyPath, data: Any) -> None:
    if storage.is_url(path):  # one PUT, applied whole; the step's commit marker comes after it
        path.write_bytes(json.dumps(data).encode())
        return
    with open(path, "w") as f:
        json.dump(data, f)
        f.flush()
        os.fsync(f.fileno())




class StateItemHandler(ocp.PyTreeCheckpointHandler):
    """Orbax's `PyTreeCheckpointHandler`, saving through `write` when it applies.

    Restoring is Orbax's (the files are its format); jaxckpt reads through
    `state_read.read_arrays` instead when `state_read.layout_arrays` says it may. A plain `ocp.CheckpointManager`
    restores the item with `args=ocp.args.Composite(state=ocp.args.PyTreeRestore(...))`.
    """

    def __init__(self, *, copy_arrays: bool = True, fast: bool | None = None):
        """Args:
          copy_arrays: copy device-aliased arrays before `async_save` returns (see `to_host`);
            a caller that waits for every save to finish before touching its arrays may pass False.
          fast: save through `write` where it applies; None: unless `fast_writer_off()` says why not.
            Either way the files and the checksums are the same.
        """
        super().__init__(use_compression=False)
        self._copy_arrays = copy_arrays
        self._fast_writer = fast_writer_off() is None if fast is None else fast

    def _fast(self, args: Any) -> bool:
        return (self._fast_writer and args.save_args is None and not getattr(args, "partial_save_mode", False)
                and can_write(args.item))

    async def async_save(self, directory: Any, item: Any = None, save_args: Any = None, args: Any = None):
        args = args or ocp.args.PyTreeSave(item, save_args=save_args)
        if not self._fast(args):
            return await super().async_save(directory, args=_with_checksums(args))
        host = to_host(args.item, copy=self._copy_arrays)  # before returning: the caller may donate them next

        async def commit() -> None:
            path = directory if isinstance(directory, epath.Path) else await directory.await_creation()
            write(path, host, args.custom_metadata)

        return [_orbax_internals()[0].CommitFutureAwaitingContractedSignals(commit(), name="jaxckpt_state_write")]

    def save(self, directory: Any, item: Any = None, save_args: Any = None, args: Any = None) -> None:
        args = args or ocp.args.PyTreeSave(item, save_args=save_args)
        if not self._fast(args):
            return super().save(directory, args=_with_checksums(args))
        write(directory, to_host(args.item, copy=False), args.custom_metadata)

    def finalize(self, directory: epath.Path) -> None:
        # Orbax merges per-process OCDBT databases here; `write` leaves none to merge.
        if any(storage.run_path(directory).glob("ocdbt.process_*")):
            super().finalize(directory)


@ocp.args.register_with_handler(StateItemHandler, for_save=True)
@dataclasses.dataclass
class StateSave(ocp.args.PyTreeSave):
    """`ocp.args.PyTreeSave` for `StateItemHandler` (Orbax picks an item's handler by its args type)."""


@ocp.args.register_with_handler(StateItemHandler, for_restore=True)
@dataclasses.dataclass
class StateRestore(ocp.args.PyTreeRestore):
    """`ocp.args.PyTreeRestore` for `StateItemHandler`: Orbax registers a handler only with both."""


def _with_checksums(args: Any) -> Any:
    """Orbax's save path: the same checksums, computed now from what this process can see."""
    custom = dict(args.custom_metadata or {})
    flat = treepath.flatten(args.item)
    custom[CUSTOM_KEY] = {**custom.get(CUSTOM_KEY, {}), "format": FORMAT, "checksum": CHECKSUM,
                          "arrays": checksums(flat)}
    shards = shard_checksums.record(flat)  # arrays sharded over processes: every shard, hashed where it lives
    if shards:
        custom[CUSTOM_KEY]["shards"] = shards
    return ocp.args.PyTreeSave(args.item, save_args=args.save_args, custom_metadata=custom,
                               ocdbt_target_data_file_size=args.ocdbt_target_data_file_size)
