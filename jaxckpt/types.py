"""Type aliases shared across jaxckpt (defined once, used in public signatures)."""

from typing import Any, Callable, Mapping

import jax

PyTree = Any
"""Any JAX pytree: nested dicts, lists, tuples, dataclasses, NamedTuples of leaves."""

Params = PyTree
"""A tree of model parameters (arrays or `jax.ShapeDtypeStruct`s)."""

Batch = Mapping[str, Any]
"""A batch of examples: a dict of arrays sharing a leading batch dimension."""

Metrics = dict[str, jax.Array]
"""Scalar metrics keyed by name."""

LossFn = Callable[[Params, Batch, jax.Array], tuple[jax.Array, Any]]
"""`loss_fn(params, batch, rng) -> (loss, aux)`."""
