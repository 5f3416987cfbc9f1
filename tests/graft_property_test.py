"""Property tests for graft over random nested trees, mappings and skips."""

import itertools
import re

import hypothesis
import jax
import numpy as np
import pytest
from hypothesis import strategies as st

from jaxckpt.grafting.graft import graft
from jaxckpt.tree import treepath

_SETTINGS = hypothesis.settings(
    max_examples=80, deadline=None,
    suppress_health_check=[hypothesis.HealthCheck.too_slow])

_NAMES = st.sampled_from(["a", "b", "c"])
_LEAF = st.tuples(st.sampled_from([(), (2,), (3,), (2, 2)]),
                  st.sampled_from([np.float32, np.float16]))
_SUBTREE = st.recursive(
    _LEAF,
    lambda children: st.one_of(
        st.dictionaries(_NAMES, children, min_size=1, max_size=3),
        st.lists(children, min_size=1, max_size=2)),
    max_leaves=8)
_TREE_SPEC = st.dictionaries(_NAMES, _SUBTREE, min_size=1, max_size=3)


def _build(spec, fill):
    if isinstance(spec, tuple):
        shape, dtype = spec
        return np.full(shape, fill(), dtype)
    if isinstance(spec, dict):
        return {k: _build(v, fill) for k, v in spec.items()}
    return [_build(v, fill) for v in spec]


def _mutate(spec, draw):
    """`spec` with some leaves reshaped, recast, dropped or added."""
    if isinstance(spec, tuple):
        change = draw(st.sampled_from(["keep", "keep", "shape", "dtype"]))
        if change == "shape":
            return (draw(st.sampled_from([(1,), (2, 3)])), spec[1])
        if change == "dtype":
            return (spec[0], np.float16 if spec[1] == np.float32 else np.float32)
        return spec
    if isinstance(spec, dict):
        out = {k: _mutate(v, draw) for k, v in spec.items()
               if len(spec) == 1 or draw(st.booleans()) or draw(st.booleans())}
        return out or {k: _mutate(v, draw) for k, v in spec.items()}
    return [_mutate(v, draw) for v in spec]


def _ancestors(paths):
    """Every path and every prefix of one, including the root ''."""
    out = {""}
    for path in paths:
        names = path.split("/")
        out.update("/".join(names[:i]) for i in range(1, len(names) + 1))
    return sorted(out)


def _names(pattern_path, path):
    return re.fullmatch(f"(?:{pattern_path})(?:/.*)?", path) is not None


@_SETTINGS
@hypothesis.given(spec=_TREE_SPEC)
def test_flatten_unflatten_round_trip(spec):
    counter = itertools.count(1)
    tree = _build(spec, lambda: next(counter))
    flat = treepath.flatten(tree)
    leaves = jax.tree_util.tree_leaves(tree)
    assert len(flat) == len(leaves)
    assert all(a is b for a, b in zip(flat.values(), leaves))
    rebuilt = treepath.unflatten(flat, tree)
    assert jax.tree_util.tree_structure(rebuilt) == \
        jax.tree_util.tree_structure(tree)
    assert all(a is b for a, b in zip(jax.tree_util.tree_leaves(rebuilt), leaves))
    # Plain nested dicts hold the same {path: leaf} (list indices become keys).
    nested = treepath.flatten(treepath.unflatten_dict(flat))
    assert sorted(nested) == sorted(flat)
    assert all(nested[p] is flat[p] for p in flat)


@_SETTINGS
@hypothesis.given(target_spec=_TREE_SPEC, data=st.data())
def test_graft_is_total_and_honest(target_spec, data):
    # Mostly a pretrained tree close to the target; sometimes an unrelated one.
    kind = data.draw(st.sampled_from(["close", "close+extra", "unrelated"]))
    hypothesis.event(f"source {kind}")
    if kind == "unrelated":
        source_spec = data.draw(_TREE_SPEC)
    else:
        source_spec = _mutate(target_spec, data.draw)
        if kind == "close+extra":
            source_spec = {**data.draw(_TREE_SPEC), **source_spec}
    counter = itertools.count(1)
    source = _build(source_spec, lambda: next(counter))
    target = _build(target_spec, lambda: -1)
    src_flat, tgt_flat = treepath.flatten(source), treepath.flatten(target)

    rules, skip = [], []
    if data.draw(st.booleans()):
        rules = data.draw(st.lists(
            st.tuples(st.sampled_from(_ancestors(src_flat)),
                      st.sampled_from(_ancestors(tgt_flat))),
            min_size=1, max_size=2, unique_by=(lambda r: r[0], lambda r: r[1])))
        if data.draw(st.booleans()):  # Same prefix on both sides, as often used.
            rules = [(d, d) for _, d in rules]
    mapping = dict(rules) or None
    if data.draw(st.booleans()):
        skip = [re.escape(p) for p in data.draw(st.lists(
            st.sampled_from(_ancestors(tgt_flat)[1:]), min_size=1, max_size=2,
            unique=True))]

    def source_path_of(path):
        if not rules:
            return path
        best = max((r for r in rules if treepath.is_under(path, r[1])),
                   key=lambda r: len(r[1]), default=None)
        return None if best is None else treepath.rebase(path, best[1], best[0])

    candidates = [p for p in tgt_flat if source_path_of(p) is not None]
    try:
        tree, report = graft(source, target, mapping=mapping, skip=skip,
                             strict=False)
    except ValueError as e:
        # Only rules that really match nothing may fail a non-strict graft.
        assert "matches no" in str(e)
        dead_skips = [s for s in skip if not any(_names(s, p) for p in candidates)]
        dead_rules = [r for r in rules
                      if not any(treepath.is_under(p, r[0]) for p in src_flat)
                      or not any(treepath.is_under(p, r[1]) for p in tgt_flat)]
        assert dead_skips or dead_rules
        hypothesis.event("a rule matched nothing")
        return
    for bucket, entries in report.to_dict().items():
        if bucket not in ("counts", "ok") and entries:
            hypothesis.event(f"some {bucket}")

    # The structure, shapes and dtypes of the target are kept.
    assert jax.tree_util.tree_structure(tree) == \
        jax.tree_util.tree_structure(target)
    out_flat = treepath.flatten(tree)
    for path, fresh in tgt_flat.items():
        assert out_flat[path].shape == fresh.shape
        assert out_flat[path].dtype == fresh.dtype

    # Every target leaf lands in exactly one bucket.
    target_buckets = ("loaded", "adapted", "mismatched", "missing", "skipped",
                      "untouched")
    placed = [e.path for b in target_buckets for e in getattr(report, b)]
    assert sorted(placed) == sorted(tgt_flat)
    assert report.adapted == ()

    for e in report.untouched:
        assert source_path_of(e.path) is None
    for e in report.skipped:
        assert any(_names(s, e.path) for s in skip)
    for e in report.missing:
        assert e.source == source_path_of(e.path) and e.source not in src_flat
    for e in report.mismatched:
        assert src_flat[e.source].shape == e.source_shape != e.target_shape
        assert np.all(out_flat[e.path] == -1)  # Kept fresh, never reshaped.
    for e in report.loaded:
        assert e.source == source_path_of(e.path)
        assert src_flat[e.source].shape == e.target_shape
        np.testing.assert_array_equal(
            out_flat[e.path], src_flat[e.source].astype(tgt_flat[e.path].dtype))
    cast = {e.path for e in report.cast}
    assert cast == {e.path for e in report.loaded
                    if src_flat[e.source].dtype != tgt_flat[e.path].dtype}

    # Every in-scope source leaf is used or reported unused, never both.
    in_scope = {p for p in src_flat
                if not rules or any(treepath.is_under(p, r[0]) for r in rules)}
    used = {e.source for b in ("loaded", "mismatched", "skipped")
            for e in getattr(report, b) if e.source in src_flat}
    unused = {e.path for e in report.unused}
    assert used | unused == in_scope
    assert not used & unused

    # Strict mode raises exactly when the report has problems.
    if report.ok:
        graft(source, target, mapping=mapping, skip=skip)
    else:
        with pytest.raises(ValueError, match="strict=True"):
            graft(source, target, mapping=mapping, skip=skip)
