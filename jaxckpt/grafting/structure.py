"""Structural adapters: graft rules that change the tree's structure on purpose.

Applied to the source's flat leaves before the graft matches paths (`graft(..., structure=...)`):
`Split`/`Fuse` (one leaf <-> N leaves along an axis, e.g. GPT-2's fused `c_attn` <-> query, key,
value) and `Stack`/`Unstack` (per-layer subtrees `layer_{i}/...` <-> one subtree with a layer axis,
as `nn.scan` makes it). `restructure` applies them; the leaves they make are `Derived`, read only
when the graft loads them, and the `GraftReport` names the rule that made each. Paths are templates
in which a `{name}` placeholder matches a decimal number (a layer index), so one rule covers every
layer. The Python API takes the rule values; `parse_structure` reads the config form.
"""

from __future__ import annotations

import re
from typing import Any, Callable, Mapping, NamedTuple, Sequence

import jax
import numpy as np


class Split(NamedTuple):
    """One source leaf cut into equal parts along `axis`, one target leaf per part.

    Example: GPT-2's fused `c_attn` into query, key and value:
    `Split("h_{i}/c_attn/kernel", ("h_{i}/query/kernel", "h_{i}/key/kernel", "h_{i}/value/kernel"), 1)`.
    """

    source: str
    targets: tuple[str, ...]
    axis: int


class Fuse(NamedTuple):
    """Several source leaves concatenated along `axis` into one target leaf (the inverse of `Split`)."""

    sources: tuple[str, ...]
    target: str
    axis: int


class Stack(NamedTuple):
    """Per-layer subtrees `source` (one placeholder: the layer index, counted from 0) stacked into one
    subtree `target` whose leaves have a new axis `axis` (0 = leading, as `nn.scan` makes them).

    Example: `Stack("encoder/layer_{i}", "encoder/layers")`: `encoder/layer_0/dense/kernel`,
    `encoder/layer_1/dense/kernel`, ... become `encoder/layers/dense/kernel` of shape `(N, ...)`.
    """

    source: str
    target: str
    axis: int = 0


class Unstack(NamedTuple):
    """A stacked subtree `source` cut along `axis` into per-layer subtrees `target` (one placeholder,
    the layer index): the inverse of `Stack`."""

    source: str
    target: str
    axis: int = 0


StructureRule = Split | Fuse | Stack | Unstack
"""A structural adapter rule."""

_PLACEHOLDER = re.compile(r"\{(\w+)\}")


def _template(pattern: str) -> re.Pattern:
    """A path template as a regex over whole paths; each `{name}` is a decimal number."""
    parts = _PLACEHOLDER.split(pattern)
    return re.compile("".join(re.escape(part) if i % 2 == 0 else rf"(?P<{part}>\d+)"
                              for i, part in enumerate(parts)))


class _SharedRead:
    """Reads one source leaf once for the `users` derived leaves built from it, then lets it go."""

    def __init__(self, leaf: Any, users: int):
        self.leaf, self._users, self._value = leaf, users, None

    def get(self) -> np.ndarray:
        if self._value is None:
            leaf = self.leaf
            self._value = np.asarray(leaf() if callable(leaf) and not hasattr(leaf, "__array__")
                                     else leaf)
        value = self._value
        self._users -= 1
        if self._users <= 0:
            self._value = None  # The last user has it; do not keep the whole tensor alive.
        return value


class Derived:
    """A source leaf that a structural rule builds from other source leaves, read on demand.

    `graft` reads it by calling it; nothing is read before. Its `rule` says how it was made, for
    the `GraftReport`.

    Attributes:
        shape: the derived leaf's shape.
        dtype: its dtype.
        inputs: the source paths it is built from.
        input_shape: the shape of (each of) those source leaves.
        rule: a description, e.g. `"split 3 on axis 1 of h_0/c_attn/kernel"`.
    """

    def __init__(self, inputs: tuple[str, ...], reads: tuple[_SharedRead, ...], shape, dtype,
                 rule: str, compute: Callable[[list[np.ndarray]], np.ndarray]):
        self.inputs, self._reads, self._compute = inputs, reads, compute
        self.shape, self.dtype, self.rule = tuple(shape), np.dtype(dtype), rule
        self.input_shape = tuple(getattr(reads[0].leaf, "shape", ()))

    @property
    def abstract(self) -> bool:
        """True if an input is a `jax.ShapeDtypeStruct`: the leaf has a shape but no value."""
        return any(isinstance(read.leaf, jax.ShapeDtypeStruct) for read in self._reads)

    def __call__(self) -> np.ndarray:
        return np.ascontiguousarray(self._compute([read.get() for read in self._reads]))

    def __repr__(self) -> str:
        return f"Derived({self.rule}, shape={self.shape}, dtype={self.dtype})"


def _shape(leaf: Any) -> tuple[int, ...]:
    return tuple(np.shape(leaf)) if not hasattr(leaf, "shape") else tuple(leaf.shape)


def _dtype(leaf: Any) -> np.dtype:
    return np.dtype(getattr(leaf, "dtype", None) or np.asarray(leaf).dtype)


def _axis(axis: int, ndim: int, rule: Any) -> int:
    if not -ndim <= axis < ndim:
        raise ValueError(f"{rule!r}: axis {axis} is out of range for a leaf of {ndim} axes.")
    return axis % ndim


def _split(rule: Split, leaves: dict, out: dict, consumed: set) -> int:
    regex, hits = _template(rule.source), 0
    for path in [p for p in leaves if regex.fullmatch(p)]:
        fields = regex.fullmatch(path).groupdict()
        shape = _shape(leaves[path])
        axis = _axis(rule.axis, len(shape), rule)
        parts = len(rule.targets)
        if shape[axis] % parts:
            raise ValueError(f"Split of {path!r} {shape}: axis {axis} ({shape[axis]}) does not cut "
                             f"into {parts} equal parts; check the rule's axis and targets.")
        size = shape[axis] // parts
        part_shape = shape[:axis] + (size,) + shape[axis + 1:]
        read = _SharedRead(leaves[path], parts)
        label = f"split {parts} on axis {axis} of {path}"
        for k, target in enumerate(rule.targets):
            take = lambda arrays, k=k, size=size, axis=axis: np.take(  # noqa: E731
                arrays[0], range(k * size, (k + 1) * size), axis=axis)
            out[target.format(**fields)] = Derived((path,), (read,), part_shape, _dtype(leaves[path]),
                                                   f"{label} (part {k})", take)
        consumed.add(path)
        hits += 1
    return hits


def _fuse(rule: Fuse, leaves: dict, out: dict, consumed: set) -> int:
    first, hits = _template(rule.sources[0]), 0
    for path in [p for p in leaves if first.fullmatch(p)]:
        fields = first.fullmatch(path).groupdict()
        paths = tuple(source.format(**fields) for source in rule.sources)
        if missing := [p for p in paths if p not in leaves]:
            raise ValueError(f"Fuse into {rule.target.format(**fields)!r}: {missing} are not in the "
                             f"source, next to {path!r}; every part must be there.")
        shapes = [_shape(leaves[p]) for p in paths]
        axis = _axis(rule.axis, len(shapes[0]), rule)
        rest = {s[:axis] + s[axis + 1:] for s in shapes}
        if len(rest) != 1 or len({len(s) for s in shapes}) != 1:
            raise ValueError(f"Fuse of {list(paths)}: shapes {shapes} differ off axis {axis}.")
        shape = shapes[0][:axis] + (sum(s[axis] for s in shapes),) + shapes[0][axis + 1:]
        out[rule.target.format(**fields)] = Derived(
            paths, tuple(_SharedRead(leaves[p], 1) for p in paths), shape, _dtype(leaves[paths[0]]),
            f"fuse on axis {axis} of {', '.join(paths)}",
            lambda arrays, axis=axis: np.concatenate(arrays, axis=axis))
        consumed.update(paths)
        hits += 1
    return hits


def _one_index(template: str, rule: Any) -> str:
    names = _PLACEHOLDER.findall(template)
    if len(names) != 1:
        raise ValueError(f"{rule!r}: the per-layer path {template!r} must hold exactly one "
                         f"placeholder, the layer index (e.g. 'encoder/layer_{{i}}'); it holds {names}.")
    return names[0]


def _stack(rule: Stack, leaves: dict, out: dict, consumed: set) -> int:
    name = _one_index(rule.source, rule)
    below = _template(rule.source + "/").pattern + "(?P<_rest>.+)"
    regex = re.compile(below)
    layers: dict[int, dict[str, str]] = {}
    for path in leaves:
        match = regex.fullmatch(path)
        if match:
            layers.setdefault(int(match[name]), {})[match["_rest"]] = path
    if not layers:
        return 0
    count = len(layers)
    if sorted(layers) != list(range(count)):
        raise ValueError(f"Stack of {rule.source!r}: the source has layers {sorted(layers)}; a stack "
                         f"needs layers 0..{count - 1} with none missing.")
    subpaths = set(layers[0])
    for index, layer in layers.items():
        if set(layer) != subpaths:
            raise ValueError(f"Stack of {rule.source!r}: layer {index} has leaves "
                             f"{sorted(set(layer) ^ subpaths)} that layer 0 lacks or the other way "
                             "round; every layer must have the same leaves.")
    for rest in sorted(subpaths):
        paths = tuple(layers[i][rest] for i in range(count))
        shapes = {_shape(leaves[p]) for p in paths}
        if len(shapes) != 1:
            raise ValueError(f"Stack of {rule.source}/{rest}: layer shapes differ ({sorted(shapes)}).")
        shape = shapes.pop()
        axis = _axis(rule.axis, len(shape) + 1, rule)
        label = (f"stack on axis {axis} of {paths[0].replace('_0/', f'_{{0..{count - 1}}}/', 1)}"
                 if "_0/" in paths[0] else f"stack on axis {axis} of {paths[0]} .. {paths[-1]}")
        out[f"{rule.target}/{rest}"] = Derived(
            paths, tuple(_SharedRead(leaves[p], 1) for p in paths),
            shape[:axis] + (count,) + shape[axis:], _dtype(leaves[paths[0]]), label,
            lambda arrays, axis=axis: np.stack(arrays, axis=axis))
        consumed.update(paths)
    return 1


def _unstack(rule: Unstack, leaves: dict, out: dict, consumed: set) -> int:
    name = _one_index(rule.target, rule)
    below = rule.source + "/"
    paths = [p for p in leaves if p.startswith(below)]
    for path in paths:
        shape = _shape(leaves[path])
        if not shape:
            raise ValueError(f"Unstack of {path!r}: a scalar has no layer axis.")
        axis = _axis(rule.axis, len(shape), rule)
        read = _SharedRead(leaves[path], shape[axis])
        rest = path[len(below):]
        for k in range(shape[axis]):
            out[f"{rule.target.format(**{name: k})}/{rest}"] = Derived(
                (path,), (read,), shape[:axis] + shape[axis + 1:], _dtype(leaves[path]),
                f"unstack layer {k} on axis {axis} of {path}",
                lambda arrays, k=k, axis=axis: np.take(arrays[0], k, axis=axis))
        consumed.add(path)
    return len(paths)


_APPLY = {Split: _split, Fuse: _fuse, Stack: _stack, Unstack: _unstack}


def restructure(leaves: Mapping[str, Any], rules: Sequence[StructureRule]) -> dict[str, Any]:
    """Applies structural rules to a flat source: the leaves they use give way to `Derived` ones.

    Rules apply in order, each to the leaves the earlier ones left or made. Nothing is read: a
    derived leaf reads its inputs when called.

    Args:
        leaves: flat source `{path: leaf}` (arrays, lazy readers, `jax.ShapeDtypeStruct`s).
        rules: `Split`, `Fuse`, `Stack` and `Unstack` values.

    Returns:
        The new flat source.

    Raises:
        ValueError: for a rule that matches no source path, a shape it cannot cut or join, or a
            derived path that an untouched source leaf already has.

    Example:
        >>> flat = {"attn/qkv": np.arange(6.0)}
        >>> out = restructure(flat, [Split("attn/qkv", ("attn/q", "attn/k", "attn/v"), 0)])
        >>> out["attn/k"]().tolist(), out["attn/k"].rule
        ([2.0, 3.0], 'split 3 on axis 0 of attn/qkv (part 1)')
    """
    current = dict(leaves)
    for rule in rules:
        apply = _APPLY.get(type(rule))
        if apply is None:
            raise ValueError(f"Structural rule {rule!r} is not a Split, Fuse, Stack or Unstack.")
        made: dict[str, Any] = {}
        consumed: set[str] = set()
        if not apply(rule, current, made, consumed):
            shown = ", ".join(sorted(current)[:8]) + (", ..." if len(current) > 8 else "")
            raise ValueError(f"Structural rule {rule!r} matches no source path (a typo, or a rule "
                             f"for another model); source paths are: {shown}.")
        kept = {p: leaf for p, leaf in current.items() if p not in consumed}
        if clash := sorted(set(kept) & set(made)):
            raise ValueError(f"{rule!r} makes {clash[:5]}, which the source already holds; map the "
                             "existing leaves elsewhere or drop the rule.")
        current = {**kept, **made}
    return current


_KINDS = {"split": Split, "fuse": Fuse, "stack": Stack, "unstack": Unstack}


def parse_structure(spec: str) -> tuple[StructureRule, ...]:
    """Parses the config form of structural rules (`checkpoint.structure`); the Python API takes
    the rule values themselves.

    Args:
        spec: rules separated by `;`, each `KIND SOURCES => TARGETS [@ AXIS]`, where KIND is
            split, fuse, stack or unstack, and SOURCES / TARGETS are comma-separated path
            templates (several targets for split, several sources for fuse). `""` is no rule.

    Returns:
        The rules, in order.

    Raises:
        ValueError: naming the malformed rule and the form it must take.

    Example:
        >>> parse_structure("split h_{i}/qkv => h_{i}/q, h_{i}/k, h_{i}/v @ 1; stack layer_{i} => layers")
        (Split(source='h_{i}/qkv', targets=('h_{i}/q', 'h_{i}/k', 'h_{i}/v'), axis=1), \
Stack(source='layer_{i}', target='layers', axis=0))
    """
    rules = []
    for text in (part.strip() for part in (spec or "").split(";")):
        if not text:
            continue
        kind, _, rest = text.partition(" ")
        body, at, axis_text = rest.partition("@")
        sources, arrow, targets = body.partition("=>")
        sources = tuple(p.strip() for p in sources.split(",") if p.strip())
        targets = tuple(p.strip() for p in targets.split(",") if p.strip())
        try:
            axis = int(axis_text) if at else None
        except ValueError:
            axis = "bad"
        rule = kind.lower()
        # (sources, targets) each rule takes: 1 exactly, or 2 for "two or more".
        counts = {"split": (1, 2), "fuse": (2, 1), "stack": (1, 1), "unstack": (1, 1)}.get(rule)
        ok = (counts is not None and arrow and axis != "bad"
              and all(n == want or (want == 2 and n > 2)
                      for n, want in ((len(sources), counts[0]), (len(targets), counts[1])))
              and (axis is not None or rule in ("stack", "unstack")))
        if not ok:
            raise ValueError(
                f"structure rule {text!r} must be one of 'split SRC => DST1, DST2, ... @ AXIS', "
                "'fuse SRC1, SRC2, ... => DST @ AXIS', 'stack LAYER_{i} => STACKED [@ AXIS]', "
                "'unstack STACKED => LAYER_{i} [@ AXIS]'; separate rules with ';'.")
        if rule == "split":
            rules.append(Split(sources[0], targets, axis))
        elif rule == "fuse":
            rules.append(Fuse(sources, targets[0], axis))
        else:
            rules.append(_KINDS[rule](sources[0], targets[0], 0 if axis is None else axis))
    return tuple(rules)
