"""Two-axis device meshes (`data` x `fsdp`) and where each leaf of a train state lives on them.

Batches split their first axis over every device (`data` and `fsdp` together). Parameters and
their optimizer state split along `fsdp`: by default each leaf over its largest dimension that
the `fsdp` size divides (replicated when none does, and always for scalars), or as a rule says.
Everything else in the state (step, rng, model state) is replicated unless a rule names it.

Rules map path regexes to `PartitionSpec`s. A rule's regex is searched (`re.search`) in each
leaf's state path (`params/encoder/Dense_0/kernel`, `opt_state/0/mu/encoder/Dense_0/kernel`), so
one rule shards a parameter and its optimizer moments alike; anchor it (`^params/`) to mean only
the parameters. The first matching rule wins. With `fsdp=1` (the default) every leaf is
replicated: pure data parallelism.

  mesh = make_mesh(data=2, fsdp=4)
  shardings = state_shardings(abstract_state, mesh, rules={"encoder/.*kernel": P("fsdp", None)})
"""

from __future__ import annotations

import math
import re
from typing import Any, Mapping, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxckpt.errors import ConfigError
from jaxckpt.tree import treepath
from jaxckpt.types import PyTree

DATA_AXIS = "data"
FSDP_AXIS = "fsdp"
AXES = (DATA_AXIS, FSDP_AXIS)
# Top-level state fields sharded along fsdp by default; the rest is replicated unless a rule says.
SHARDED_BY_DEFAULT = ("params", "opt_state", "ema_params")

Rules = Mapping[str, Any] | Sequence[tuple[str, Any]]
"""`{regex: PartitionSpec | sequence of axis names / None}` or `[(regex, spec), ...]`."""


def axis_sizes(data: int, fsdp: int, device_count: int) -> tuple[int, int]:
    """The sizes of the `data` and `fsdp` axes; one of them may be -1 or 0 for "the rest".

    Raises:
      ConfigError: if the sizes do not multiply to `device_count`, or both are "the rest".
    """
    data, fsdp = int(data), int(fsdp)
    rest = [name for name, v in (("data", data), ("fsdp", fsdp)) if v <= 0]
    if len(rest) == 2:
        raise ConfigError(f"mesh.data={data} and mesh.fsdp={fsdp} both say 'the rest'; set one of them "
                          f"to a size (their product must be the {device_count} devices).")
    if rest:
        known = fsdp if rest[0] == "data" else data
        if device_count % known:
            raise ConfigError(f"mesh.{'fsdp' if rest[0] == 'data' else 'data'}={known} does not divide the "
                              f"{device_count} devices; use a divisor of {device_count}.")
        data, fsdp = (device_count // known, fsdp) if rest[0] == "data" else (data, device_count // known)
    if data * fsdp != device_count:
        raise ConfigError(f"mesh.data={data} x mesh.fsdp={fsdp} = {data * fsdp}, but this job has {device_count} "
                          f"devices; make the product {device_count} (or set one axis to -1 for the rest).")
    return data, fsdp


def make_mesh(data: int = -1, fsdp: int = 1, devices: Sequence[Any] | None = None) -> Mesh:
    """A `data` x `fsdp` mesh over `devices` (default: every device of every process).

    Devices are laid out so that one process's devices are neighbours on the `fsdp` axis, which
    keeps the all-gathers of a sharded parameter within a host where the sizes allow.

    Args:
      data: size of the data-parallel axis; -1 or 0 for the devices `fsdp` leaves.
      fsdp: size of the axis parameters are sharded along; -1 or 0 for the rest.
      devices: the devices; default `jax.devices()`.

    Returns:
      A `jax.sharding.Mesh` with axes `("data", "fsdp")`.

    Raises:
      ConfigError: if `data * fsdp` is not the number of devices.

    Example:
      >>> mesh = make_mesh(data=2, fsdp=4)  # doctest: +SKIP
    """
    devices = list(jax.devices() if devices is None else devices)
    data, fsdp = axis_sizes(data, fsdp, len(devices))
    devices.sort(key=lambda d: (d.process_index, d.id))
    return Mesh(np.asarray(devices, dtype=object).reshape(data, fsdp), AXES)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """A batch's sharding: its first axis split over every device of the mesh."""
    return NamedSharding(mesh, PartitionSpec(tuple(mesh.axis_names)))


def _compile(regex: str) -> re.Pattern[str]:
    try:
        return re.compile(regex)
    except re.error as e:
        raise ConfigError(f"mesh.rules regex {regex!r} does not compile: {e}.") from None


def _as_rules(rules: Rules | None) -> list[tuple[re.Pattern[str], PartitionSpec]]:
    if not rules:
        return []
    if isinstance(rules, str):
        raise TypeError(f"rules must be a dict or sequence of (regex, PartitionSpec), e.g. "
                        f"{{'encoder/.*kernel': P('fsdp', None)}}; got the string {rules!r} (the string form is for "
                        "configs and command lines: parse it with jaxckpt.config_strings.parse_mesh_rules).")
    items = rules.items() if isinstance(rules, Mapping) else rules
    return [(_compile(r), s if isinstance(s, PartitionSpec) else PartitionSpec(*s)) for r, s in items]


def _spec_axes(spec: PartitionSpec) -> list[str]:
    out = []
    for entry in spec:
        out += [] if entry is None else [entry] if isinstance(entry, str) else list(entry)
    return out


def _check_rule(path: str, shape: tuple[int, ...], regex: str, spec: PartitionSpec, mesh: Mesh) -> None:
    unknown = [a for a in _spec_axes(spec) if a not in mesh.shape]
    if unknown:
        raise ConfigError(f"mesh rule {regex!r} -> {spec} names axis {unknown[0]!r}, which the mesh does not have; "
                          f"its axes are {list(mesh.axis_names)}.")
    if len(spec) > len(shape):
        raise ConfigError(f"mesh rule {regex!r} -> {spec} has {len(spec)} entries but {path} has shape {shape} "
                          f"({len(shape)} dimensions); give at most one entry per dimension.")
    for dim, entry in enumerate(spec):
        axes = () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)
        size = math.prod(mesh.shape[a] for a in axes)
        if shape[dim] % size:
            raise ConfigError(
                f"mesh rule {regex!r} -> {spec} splits dimension {dim} of {path} (shape {shape}) into {size} "
                f"parts, which does not divide {shape[dim]}; change the rule or the mesh.fsdp/mesh.data sizes.")


def default_spec(shape: tuple[int, ...], fsdp: int) -> PartitionSpec:
    """The largest dimension that `fsdp` divides split along `fsdp` (the first of equals); else replicated."""
    if fsdp <= 1:
        return PartitionSpec()
    divisible = [d for d, n in enumerate(shape) if n % fsdp == 0 and n >= fsdp]
    if not divisible:
        return PartitionSpec()
    dim = max(divisible, key=lambda d: (shape[d], -d))
    return PartitionSpec(*([None] * dim + [FSDP_AXIS]))


def state_shardings(tree: PyTree, mesh: Mesh, rules: Rules | None = None, *, prefix: str = "",
                    require_match: bool = True) -> PyTree:
    """A `NamedSharding` per leaf of `tree` (arrays or `jax.ShapeDtypeStruct`s), shaped like `tree`.

    Args:
      tree: a train state, or part of one (then `prefix` says where it sits, e.g. `"params/"`).
      mesh: a mesh from `make_mesh`.
      rules: path regex -> spec (see the module docstring); `config.mesh.rules`'s string form
        goes through `jaxckpt.config_strings.parse_mesh_rules` first.
      prefix: prepended to each leaf's path before matching.
      require_match: raise if a rule matches no leaf (a misspelt rule would silently do nothing).

    Returns:
      The shardings, in the structure of `tree` (static fields kept).

    Raises:
      ConfigError: for a rule naming an axis the mesh lacks, a spec that does not divide a leaf's
        shape (naming the path, shape and spec), or (with `require_match`) a rule matching nothing.

    Example:
      >>> shardings = state_shardings(abstract_state, mesh, {"encoder/.*kernel": P("fsdp", None)})  # doctest: +SKIP
      >>> state = jax.jit(init, out_shardings=shardings)(rng)  # doctest: +SKIP
    """
    compiled = _as_rules(rules)
    used = [False] * len(compiled)
    fsdp = mesh.shape.get(FSDP_AXIS, 1)
    flat = treepath.flatten(tree)
    out = {}
    for path, leaf in flat.items():
        full, shape = prefix + path, tuple(np.shape(leaf))
        spec = None
        for i, (regex, rule_spec) in enumerate(compiled):
            if regex.search(full):
                _check_rule(full, shape, regex.pattern, rule_spec, mesh)
                spec, used[i] = rule_spec, True
                break
        if spec is None:
            default = full.split("/", 1)[0] in SHARDED_BY_DEFAULT
            spec = default_spec(shape, fsdp) if default else PartitionSpec()
        out[path] = NamedSharding(mesh, spec)
    unused = [regex.pattern for (regex, _), u in zip(compiled, used) if not u]
    if require_match and unused:
        raise ConfigError(f"mesh rule(s) {unused} match no leaf of the state; paths look like "
                          f"{treepath.preview([prefix + p for p in flat], 5)}.")
    return treepath.unflatten(out, tree)


def with_shardings(tree: PyTree, shardings: PyTree) -> PyTree:
    """Abstract leaves (`jax.ShapeDtypeStruct`) of `tree`, each with its sharding from `shardings`."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=s), tree, shardings)


def describe(mesh: Mesh) -> str:
    """`"2 data x 4 fsdp"` for logs."""
    return " x ".join(f"{mesh.shape[a]} {a}" for a in mesh.axis_names)
