"""Scale-out with JAX's own tools: `jax.distributed` processes, meshes, and agreeing processes.

The loop runs over every device of every process on a `data` x `fsdp` mesh (`jaxckpt.runner.mesh`):
batches are split along their first axis over all devices; parameters are replicated (`fsdp=1`)
or sharded along `fsdp`. Every process reads the same global batch (pipelines are seeded), so
each one can hand JAX the rows its devices own. Decisions that all processes must take together
(stop now, a step is corrupt) go through `any_process`/`all_processes`: one small host allgather,
and nothing at all in a single-process run.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxckpt.types import Batch, PyTree

DATA_AXIS = "data"


def initialize(coordinator_address: str, num_processes: int, process_id: int) -> None:
    """Joins a multi-process JAX run (call before any other JAX work).

    On CPU the collectives go through gloo, so two processes on one machine (loopback) work.

    Args:
      coordinator_address: `host:port` of process 0.
      num_processes: total number of processes.
      process_id: this process's index in `[0, num_processes)`.

    Raises:
      ValueError: if `process_id` is out of range.
    """
    if not 0 <= process_id < num_processes:
        raise ValueError(f"process_id={process_id} must be in [0, {num_processes}).")
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                               process_id=process_id)


def data_mesh() -> Mesh:
    """A mesh over all devices of all processes with a single `"data"` axis."""
    return Mesh(np.asarray(jax.devices()), (DATA_AXIS,))


def run_mesh(config: Any) -> Mesh:
    """The run's `data` x `fsdp` mesh from `config.mesh` (see `jaxckpt.runner.mesh.make_mesh`)."""
    from jaxckpt.runner.mesh import make_mesh

    return make_mesh(config.mesh.data, config.mesh.fsdp)


def _gathered_flags(flag: bool) -> np.ndarray:
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(np.asarray([int(bool(flag))], np.int32)))


def any_process(flag: bool) -> bool:
    """Whether `flag` is true on any process: one host allgather when several processes run.

    Every process must call it at the same point. If another process died, the allgather fails
    (gloo sees the connection drop) and `jax.distributed`'s heartbeat ends this process's shutdown,
    so none waits forever (tests/sharding_test.py kills one of two).
    """
    if jax.process_count() == 1:
        return bool(flag)
    return bool(_gathered_flags(flag).any())


def all_processes(flag: bool) -> bool:
    """Whether `flag` is true on every process (see `any_process`)."""
    if jax.process_count() == 1:
        return bool(flag)
    return bool(_gathered_flags(flag).all())


def replicated(mesh: Mesh) -> NamedSharding:
    """The sharding of a value copied on every device of `mesh`."""
    return NamedSharding(mesh, PartitionSpec())


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """The sharding of a batch split along its first axis over every axis (every device) of `mesh`."""
    return NamedSharding(mesh, PartitionSpec(tuple(mesh.axis_names)))


def check_batch_size(batch_size: int, mesh: Mesh, what: str) -> None:
    """Raises a clear error if `batch_size` cannot be split evenly over the mesh's devices."""
    n = mesh.devices.size
    if batch_size % n:
        raise ValueError(
            f"{what}={batch_size} cannot be split over {n} devices; use a multiple of {n}.")


def shard_batch(batch: Batch, mesh: Mesh) -> Batch:
    """Places a host batch (the same global batch on every process) onto the mesh, split by rows."""
    sharding = batch_sharding(mesh)
    if jax.process_count() == 1:
        return jax.device_put(dict(batch), sharding)
    return {k: jax.make_array_from_callback(np.shape(v), sharding, lambda idx, v=v: np.asarray(v)[idx])
            for k, v in batch.items()}


def abstract_like(tree: PyTree, sharding: Any) -> PyTree:
    """Abstract leaves (`jax.ShapeDtypeStruct`) of `tree`, each with `sharding`."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=sharding), tree)


def to_host(tree: PyTree) -> PyTree:
    """Host numpy copies of the global values of (possibly multi-process) arrays.

    A replicated array is read from this process's copy; one split over processes (e.g. a batch
    of predictions, rows over every device) is gathered, so every process must call this at the
    same point.
    """
    def fetch(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            if x.sharding.is_fully_replicated:
                return np.asarray(x.addressable_data(0))
            from jax.experimental import multihost_utils

            return np.asarray(multihost_utils.process_allgather(x, tiled=True))
        return np.asarray(x)
    return jax.tree.map(fetch, tree)
