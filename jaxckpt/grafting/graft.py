"""Graft pretrained leaves into a freshly initialised tree, and report every leaf.

`graft(source, target)` returns the target tree with each leaf taken from the
source where the paths and shapes agree, and a `GraftReport` that puts every
target leaf in exactly one bucket:

* `loaded`     copied from the source (cast to the target dtype if needed);
* `adapted`    shapes differ and an `adapters` rule reshaped it on purpose;
* `mismatched` shapes differ: kept fresh at the target shape, never padded,
               truncated or reshaped silently;
* `missing`    no source leaf at the mapped path: kept fresh;
* `skipped`    a `skip` rule keeps it fresh;
* `untouched`  outside every mapped destination: kept fresh, not a problem.

Source leaves in scope that no target leaf takes are `unused`; dtype casts are
listed in `cast`. In strict mode (the default) any missing, mismatched or unused
leaf raises one `ValueError` listing them all. A mapping rule, skip pattern or
adapter rule that matches nothing is always an error.

Reading only what is needed: source leaves may be `jax.ShapeDtypeStruct`s, lazy
objects with `.shape`/`.dtype` that are read with `np.asarray` (e.g. an
on-disk array), or zero-argument callables returning the array (given
`.shape`/`.dtype` attributes they are not called until needed; without, they are
called once while planning). A source leaf is read only when it is `loaded` or
`adapted` into a *concrete* target leaf. Target leaves that are
`jax.ShapeDtypeStruct`s are never filled: the result keeps them, so grafting
abstract trees returns the plan (`plan()` returns just the report and never
reads anything).

Structural rules (`structure=[Split(...), Fuse(...), Stack(...), Unstack(...)]`, see
`jaxckpt.grafting.structure`) reshape the source's tree first: the leaves they make are read only
when loaded, and the report gives each the rule that made it (`GraftEntry.rule`).

Results keep the target's dtype and, for `jax.Array` targets, its sharding.
"""

import contextlib
import dataclasses
import gc
from typing import Any, Callable, Mapping, Sequence

import jax
import numpy as np

# Adapter and GraftEntry are also imported from here by callers.
from jaxckpt.grafting.adapters import Adapter, adapt, adapter_name, normalize_adapters
from jaxckpt.grafting.mapping import dead_rules, normalize_mapping, source_paths, strip_prefix, unused_sources
from jaxckpt.grafting.report import GraftEntry, GraftReport
from jaxckpt.grafting.structure import Derived, StructureRule, restructure
from jaxckpt.tree import pathmatch, treepath
from jaxckpt.types import PyTree

_DTYPE_NAMES: dict[Any, str] = {}


def _dtype_name(dtype: np.dtype) -> str:
    name = _DTYPE_NAMES.get(dtype)
    if name is None:
        name = _DTYPE_NAMES[dtype] = str(dtype)
    return name


def _shape_dtype(
    leaf: Any, shapes: dict | None = None,
) -> tuple[tuple[int, ...], np.dtype]:
    """Shape and dtype; a numpy leaf's shape is taken from `shapes` when equal.

    A numpy shape is a tuple of ints, so one equal to it is the same value: sharing
    keeps a report on 100k leaves of a few shapes at a few tuples, not 200k.
    """
    if type(leaf) is np.ndarray:  # The common case, without the getattr probing.
        shape = leaf.shape
        return (shape if shapes is None else shapes.setdefault(shape, shape),
                leaf.dtype)
    shape, dtype = getattr(leaf, "shape", None), getattr(leaf, "dtype", None)
    if shape is not None and dtype is not None:
        return (shape if type(shape) is tuple else tuple(shape),
                dtype if isinstance(dtype, np.dtype) else np.dtype(dtype))
    array = np.asarray(leaf)  # Python scalars and other array-likes.
    return array.shape, array.dtype


def _source_leaves(source: PyTree) -> tuple[list[str], list[Any]]:
    """Source paths and leaves; a dict with '/' in its keys is taken as flat."""
    if isinstance(source, Mapping) and any(
        isinstance(k, str) and treepath.SEP in k for k in source):
        paths, leaves = [], []
        for key, value in source.items():
            sub_paths, sub_leaves, _ = treepath.flatten_with_treedef(value)
            paths += [treepath.join(strip_prefix(str(key)), p) for p in sub_paths]
            leaves += sub_leaves
        if len(set(paths)) != len(paths):
            raise ValueError("The flat source dict names some path twice (e.g. 'a/b'"
                             " and a key 'a' holding {'b': ...}); keep one.")
        return paths, leaves
    paths, leaves, _ = treepath.flatten_with_treedef(source)
    return paths, leaves


def _rule_errors(kind: str, rules: Sequence[str], side: str) -> list[str]:
    return [f"{kind} {rule!r} matches no {side} path" for rule in rules]


@dataclasses.dataclass
class _Plan:
    report: GraftReport
    # Per target leaf: the index of the source leaf that fills it, or None (a
    # list rather than a dict of tuples: fewer objects per leaf).
    fill_from: list[int | None]
    adapters: dict[int, Adapter]  # By target index, for the adapted leaves.
    source_leaves: list[Any]
    target_paths: list[str]
    target_leaves: list[Any]
    treedef: Any


@contextlib.contextmanager
def _gc_paused():
    """Pauses the cyclic GC for a plan or a graft: they allocate a few small
    objects per leaf and nothing cyclic, yet on 100k leaves the collector's passes
    over the trees, set off by those allocations and by the dicts `unflatten`
    builds, would take longer than the work itself."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _index_of(paths: Sequence[str]) -> Callable[[str], int | None]:
    """Finds a path's index in `paths`, trying the one after the last found first.

    A source usually lists its leaves in the target's order (the same model,
    maybe renamed), so a lookup is mostly one comparison with the next path; the
    dict is built at the first miss. On 100k leaves, probes into a dict that
    size mostly miss the CPU cache, while the next path usually sits in it.
    """
    index: dict[str, int] = {}
    after_last = 0

    def find(path: str) -> int | None:
        nonlocal after_last
        if after_last < len(paths) and paths[after_last] == path:
            j = after_last
        else:
            if not index:
                index.update(zip(paths, range(len(paths))))
            j = index.get(path)
            if j is None:
                return None
        after_last = j + 1
        return j
    return find


def _make_plan(source, target, mapping, skip, adapters, structure=()) -> _Plan:
    rules = normalize_mapping(mapping)
    adapter_rules = normalize_adapters(adapters)
    src_paths, src_leaves = _source_leaves(source)
    if structure:
        flat = restructure(dict(zip(src_paths, src_leaves)), structure)
        src_paths, src_leaves = list(flat), list(flat.values())
    tgt_paths, tgt_leaves, treedef = treepath.flatten_with_treedef(target)

    # Called once: a bare callable's shape is only known from its value.
    for i, leaf in enumerate(src_leaves):
        if callable(leaf) and getattr(leaf, "shape", None) is None:
            src_leaves[i] = leaf()
    shapes: dict[tuple[int, ...], tuple[int, ...]] = {}
    src_info = [_shape_dtype(leaf, shapes) for leaf in src_leaves]

    sources = source_paths(rules, tgt_paths)
    errors = dead_rules(rules, src_paths, tgt_paths)
    skip_matcher = pathmatch.PathMatcher(skip, syntax="regex")
    adapt_matcher = pathmatch.PathMatcher([p for p, _ in adapter_rules],
                                         syntax="regex")
    candidate_paths = [p for p, s in zip(tgt_paths, sources) if s is not None]
    errors += _rule_errors("skip pattern", skip_matcher.unmatched(candidate_paths),
                           "target")
    errors += _rule_errors("adapter rule",
                           adapt_matcher.unmatched(candidate_paths), "target")
    if errors:
        scope = "" if rules is None else " under the mapped target prefixes"
        raise ValueError(
            "graft rules that match nothing (a typo, or a rule for another model):"
            "\n  " + "\n  ".join(errors) + f"\nSkip and adapter rules are regexes"
            f" over target paths{scope}, matching a whole path or a whole subtree;"
            " mapping rules are path prefixes. Fix or drop these rules.")

    buckets = {f.name: [] for f in dataclasses.fields(GraftReport)}
    loaded, cast = buckets["loaded"], buckets["cast"]
    skip_first = skip_matcher.first if skip else None
    fill_from: list[int | None] = [None] * len(tgt_paths)
    adapters_at: dict[int, Adapter] = {}
    used = bytearray(len(src_paths))  # 1 where a target leaf looked the source up.
    untouched_at = []
    index_of = _index_of(src_paths)
    for i, (path, src_path) in enumerate(zip(tgt_paths, sources)):
        if src_path is None:
            untouched_at.append(i)
            continue
        tgt_shape, tgt_dtype = _shape_dtype(tgt_leaves[i], shapes)
        tgt_dtype_name = _dtype_name(tgt_dtype)
        j = index_of(src_path)
        if j is not None:
            used[j] = 1
        rule = skip_first(path) if skip_first else None
        if rule is not None:
            buckets["skipped"].append(GraftEntry(
                path, src_path, None, tgt_shape, None, tgt_dtype_name,
                skip_matcher.patterns[rule]))
            continue
        if j is None:
            buckets["missing"].append(GraftEntry(
                path, src_path, None, tgt_shape, None, tgt_dtype_name))
            continue
        src_shape, src_dtype = src_info[j]
        src_dtype_name = _dtype_name(src_dtype)
        # _make: tuple.__new__ itself, half the cost of GraftEntry's own __new__.
        made_by = src_leaves[j].rule if type(src_leaves[j]) is Derived else None
        entry = GraftEntry._make((path, src_path, src_shape, tgt_shape,
                                  src_dtype_name, tgt_dtype_name, made_by))
        if src_shape == tgt_shape:
            loaded.append(entry)
            fill_from[i] = j
        else:
            rule = adapt_matcher.first(path) if adapter_rules else None
            if rule is None:
                buckets["mismatched"].append(entry)
                continue
            adapter = adapter_rules[rule][1]
            if not callable(adapter) and len(src_shape) != len(tgt_shape):
                raise ValueError(
                    f"Adapter {adapter!r} (rule {adapter_rules[rule][0]!r}) cannot map"
                    f" {src_path!r} {src_shape} onto {path!r} {tgt_shape}: the number of"
                    " axes differs. Pass a callable adapter that reshapes it, or skip"
                    " the path.")
            name = adapter_name(adapter)
            buckets["adapted"].append(entry._replace(
                rule=name if made_by is None else f"{made_by}, then {name}"))
            fill_from[i] = j
            adapters_at[i] = adapter
        if src_dtype != tgt_dtype:
            cast.append(GraftEntry(
                path, src_path, None, None, src_dtype_name, tgt_dtype_name))
    buckets["untouched"] = [
        GraftEntry(tgt_paths[i], None, None, _shape_dtype(tgt_leaves[i], shapes)[0])
        for i in untouched_at]
    buckets["unused"] = [
        GraftEntry(src_paths[j], src_paths[j], src_info[j][0], None,
                   _dtype_name(src_info[j][1]))
        for j in unused_sources(rules, src_paths, used)]
    report = GraftReport(**{k: tuple(v) for k, v in buckets.items()})
    return _Plan(report, fill_from, adapters_at, src_leaves, tgt_paths, tgt_leaves,
                 treedef)


# Paused around whole functions, so that their per-leaf working lists are gone
# by the time the GC resumes and walks what the call allocated.
@_gc_paused()
def _planned_report(source, target, mapping, skip, adapters, structure) -> GraftReport:
    return _make_plan(source, target, mapping, skip, adapters, structure).report


@_gc_paused()
def _planned_graft(source, target, mapping, skip, adapters, strict, structure):
    planned = _make_plan(source, target, mapping, skip, adapters, structure)
    if strict:
        planned.report.check()
    return planned.treedef.unflatten(_filled_leaves(planned)), planned.report


def plan(
    source: PyTree,
    target: PyTree,
    *,
    mapping: Mapping[str, str] | None = None,
    skip: Sequence[str] = (),
    adapters: Mapping[str, Adapter] | None = None,
    structure: Sequence[StructureRule] = (),
) -> GraftReport:
    """The report `graft` would give, without reading any array.

    Never raises for missing, mismatched or unused leaves (see `report.ok` and
    `report.check()`); bare callables in `source` are called to learn shapes.

    Args:
        source, target, mapping, skip, adapters, structure: as for `graft`.

    Returns:
        The complete `GraftReport`.

    Raises:
        ValueError: for malformed rules or rules that match nothing.
        TypeError: for a string where rules are expected (as for `graft`).

    Example:
        >>> sds = jax.ShapeDtypeStruct
        >>> plan({"w": sds((2,), np.float32)}, {"w": sds((3,), np.float32)},
        ...      ).counts["mismatched"]
        1
    """
    if isinstance(skip, str):
        raise TypeError(f"skip must be a sequence of regexes; got the string"
                        f" {skip!r}. Wrap it in a list.")
    return _planned_report(source, target, mapping, tuple(skip), adapters, tuple(structure))


def _read(leaf: Any) -> Any:
    if isinstance(leaf, (jax.Array, np.ndarray)):
        return leaf
    if callable(leaf):
        return leaf()
    return np.asarray(leaf)  # Lazy readers (`__array__`) and scalars.


def _place(value: Any, target_leaf: Any, dtype: np.dtype) -> Any:
    """`value` with the target leaf's dtype and, for jax.Arrays, sharding."""
    if isinstance(target_leaf, jax.Array):
        if not isinstance(value, jax.Array):
            value = np.asarray(value)
        if value.dtype != dtype:
            value = value.astype(dtype)
        return jax.device_put(value, target_leaf.sharding)
    return np.asarray(value, dtype=dtype)


def _is_abstract(leaf: Any) -> bool:
    """A leaf with a shape but no value: a ShapeDtypeStruct, or one derived from one."""
    return isinstance(leaf, jax.ShapeDtypeStruct) or (type(leaf) is Derived and leaf.abstract)


def _filled_leaves(planned: _Plan) -> list[Any]:
    """The target leaves, with each planned fill read, adapted, cast and placed.

    Raises:
        TypeError: if a concrete target leaf would be filled from an abstract
            one; raised before anything is read.
    """
    leaves = list(planned.target_leaves)
    to_read = []  # (target, source) indices of the fills that read or convert.
    for i, j in enumerate(planned.fill_from):
        if j is None:
            continue
        target_leaf, source_leaf = leaves[i], planned.source_leaves[j]
        if (type(source_leaf) is np.ndarray and type(target_leaf) is np.ndarray
                and source_leaf.dtype == target_leaf.dtype
                and i not in planned.adapters):
            leaves[i] = source_leaf  # What _read and _place give; nothing is read.
        else:
            to_read.append((i, j))
    abstract_reads = [
        planned.target_paths[i] for i, j in to_read
        if _is_abstract(planned.source_leaves[j])
        and not isinstance(leaves[i], jax.ShapeDtypeStruct)]
    if abstract_reads:
        raise TypeError(
            f"Source leaves for {abstract_reads} are abstract"
            " (jax.ShapeDtypeStruct) but their target leaves are concrete arrays."
            " Pass arrays or lazy readers as the source, or an abstract target to"
            " get only the plan.")
    for i, j in to_read:
        target_leaf = leaves[i]
        if isinstance(target_leaf, jax.ShapeDtypeStruct):
            continue  # Planning only: nothing is read for abstract targets.
        shape, dtype = _shape_dtype(target_leaf)
        value = _read(planned.source_leaves[j])
        adapter = planned.adapters.get(i)
        if adapter is not None:
            value = adapt(adapter, value, target_leaf, shape, dtype,
                          planned.target_paths[i])
        leaves[i] = _place(value, target_leaf, dtype)
    return leaves


def graft(
    source: PyTree,
    target: PyTree,
    *,
    mapping: Mapping[str, str] | None = None,
    skip: Sequence[str] = (),
    strict: bool = True,
    adapters: Mapping[str, Adapter] | None = None,
    structure: Sequence[StructureRule] = (),
) -> tuple[PyTree, GraftReport]:
    """Fills `target` with `source` leaves where paths and shapes agree.

    Args:
        source: pytree (or flat `{"a/b": leaf}` dict) of arrays, lazy readers,
            callables or `jax.ShapeDtypeStruct`s.
        target: the freshly initialised pytree (arrays or `ShapeDtypeStruct`s).
        mapping: None for the whole tree onto itself, or a dict of source prefix ->
            target prefix (`{"bert": "encoder"}`). Only target leaves under a
            destination are candidates (the rest are `untouched`); only source leaves
            under a source prefix are in scope.
        skip: regexes of target paths to keep fresh (each names a path or subtree).
        strict: raise if anything is missing, mismatched or unused; otherwise keep
            those target leaves fresh and only report them.
        adapters: `{regex: "resize" | "interpolate" | fn}`: shape-mismatched target leaves a rule names are
            adapted on purpose. `resize` copies the overlapping block (the rest keeps
            the fresh init); `interpolate` resamples linearly along the axes whose
            size differs; `fn(source_array, target_leaf)` returns the new leaf.
        structure: structural rules applied to the source before paths are matched, in order:
            `Split`, `Fuse`, `Stack`, `Unstack` (`jaxckpt.grafting.structure`). A leaf one of them
            makes is reported with the rule (`GraftEntry.rule`); a rule matching nothing is an
            error.

    Returns:
        `(tree, report)`: `tree` has the target's structure, dtypes and shardings;
        abstract target leaves stay abstract (the call is then a plan).

    Raises:
        ValueError: in strict mode, one error listing every missing, mismatched
            and unused path with shapes; always, for rules that match nothing or are
            malformed.
        TypeError: if a concrete target leaf would be filled from an abstract one,
            or for a string where rules are expected (parse config strings with
            `jaxckpt.config_strings`).

    Example:
        >>> pretrained = {"encoder": {"w": np.ones((2, 2))}, "head": np.ones(3)}
        >>> fresh = {"encoder": {"w": np.zeros((2, 2))}, "head": np.zeros(5)}
        >>> tree, report = graft(pretrained, fresh, skip=["head"])
        >>> float(tree["encoder"]["w"][0, 0]), report.counts["skipped"]
        (1.0, 1)
    """
    if isinstance(skip, str):
        raise TypeError(f"skip must be a sequence of regexes; got the string"
                        f" {skip!r}. Wrap it in a list.")
    return _planned_graft(source, target, mapping, tuple(skip), adapters, strict,
                          tuple(structure))
