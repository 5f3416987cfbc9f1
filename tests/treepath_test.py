"""Tests for jaxckpt.treepath: flatten/unflatten round trips and path matching."""

from typing import NamedTuple

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax.core import FrozenDict

from jaxckpt.tree import treepath


class Pair(NamedTuple):
    first: jax.Array
    second: dict


@flax.struct.dataclass
class Holder:
    params: dict
    step: int
    fn: object = flax.struct.field(pytree_node=False, default=None)


def _assert_same_tree(a, b):
    assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.parametrize("tree, paths", [
    ({"b": {"kernel": 1, "bias": 2}, "a": 3}, ["a", "b/bias", "b/kernel"]),
    (FrozenDict({"enc": {"w": 1}, "dec": {"w": 2}}), ["dec/w", "enc/w"]),
    ([1, [2, 3]], ["0", "1/0", "1/1"]),
    ((1, (2,)), ["0", "1/0"]),
    (Pair(jnp.ones(2), {"x": 1}), ["first", "second/x"]),
    (Holder(params={"w": jnp.ones(3)}, step=4), ["params/w", "step"]),
    ({"a": None, "b": [1, None, 2]}, ["b/0", "b/2"]),
    (jnp.ones(2), [""]),
])
def test_flatten_paths_and_round_trip(tree, paths):
    flat = treepath.flatten(tree)
    assert list(flat) == paths
    assert treepath.tree_paths(tree) == paths
    # Key order is the tree's own leaf order.
    assert [id(v) for v in flat.values()] == [
        id(v) for v in jax.tree_util.tree_leaves(tree)]
    _assert_same_tree(treepath.unflatten(flat, tree), tree)


def test_none_subtrees_come_back_from_like():
    tree = {"a": None, "b": [1, None]}
    rebuilt = treepath.unflatten({"b/0": 7}, tree)
    assert rebuilt == {"a": None, "b": [7, None]}


def test_optax_state_round_trip():
    params = {"dense": {"kernel": jnp.ones((2, 3)), "bias": jnp.zeros(3)}}
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-3))
    state = tx.init(params)
    flat = treepath.flatten(state)
    assert "1/0/mu/dense/kernel" in flat
    assert "1/0/count" in flat
    _assert_same_tree(treepath.unflatten(flat, state), state)


def test_flatten_agrees_with_jax_for_custom_node():
    # A registered node without keys gets FlattenedIndexKey names.
    @jax.tree_util.register_pytree_node_class
    class Box:
        def __init__(self, items):
            self.items = items

        def tree_flatten(self):
            return tuple(self.items), None

        @classmethod
        def tree_unflatten(cls, aux, children):
            return cls(list(children))

    tree = {"box": Box([1, 2])}
    flat = treepath.flatten(tree)
    assert flat == {"box/0": 1, "box/1": 2}
    assert treepath.unflatten(flat, tree)["box"].items == [1, 2]


def test_same_path_twice_is_an_error():
    @jax.tree_util.register_pytree_with_keys_class
    class Twins:
        def __init__(self, a, b):
            self.a, self.b = a, b

        def tree_flatten_with_keys(self):
            key = jax.tree_util.GetAttrKey("x")
            return ((key, self.a), (key, self.b)), None

        @classmethod
        def tree_unflatten(cls, aux, children):
            return cls(*children)

    with pytest.raises(ValueError, match="same path.*'t/x'"):
        treepath.flatten({"t": Twins(1, 2)})


@pytest.mark.parametrize("tree", [{"a": {"b/c": 1}}, {"a": {"": 1}}])
def test_bad_key_names_are_errors(tree):
    with pytest.raises(ValueError, match="under 'a'"):
        treepath.flatten(tree)


def test_unflatten_names_missing_and_extra_paths():
    with pytest.raises(ValueError, match=r"Missing paths: 'a/1'.*Extra.*'a/2'"):
        treepath.unflatten({"a/0": 1, "a/2": 3}, {"a": [0, 0]})


def test_unflatten_dict():
    assert treepath.unflatten_dict({"a/b": 1, "a/c/d": 2, "e": 3}) == {
        "a": {"b": 1, "c": {"d": 2}}, "e": 3}
    with pytest.raises(ValueError, match="both a leaf and"):
        treepath.unflatten_dict({"a": 1, "a/b": 2})
    with pytest.raises(ValueError, match="'a' .*itself a leaf|both a leaf"):
        treepath.unflatten_dict({"a/b": 1, "a": 2})
    with pytest.raises(ValueError, match="empty name"):
        treepath.unflatten_dict({"a//b": 1})


def test_flatten_then_unflatten_dict_round_trips():
    tree = {"enc": {"layers": {"0": {"w": 1}}}, "head": {"b": 2}}
    assert treepath.unflatten_dict(treepath.flatten(tree)) == tree


def test_prefix_helpers():
    assert treepath.is_under("head/kernel", "head")
    assert treepath.is_under("head", "head")
    assert treepath.is_under("anything/at/all", "")
    assert not treepath.is_under("lm_head/kernel", "head")
    assert not treepath.is_under("headx", "head")
    assert treepath.join("", "a", "", "b") == "a/b"
    assert treepath.rebase("bert/l0/w", "bert", "enc") == "enc/l0/w"
    assert treepath.rebase("w", "", "enc") == "enc/w"
    assert treepath.rebase("bert/w", "bert", "") == "w"
    with pytest.raises(ValueError, match="not under"):
        treepath.rebase("x/w", "bert", "enc")


def test_flatten_wide_tree_in_leaf_order():
    tree = {f"l{i}": {"w": jnp.zeros(()), "b": [1, 2]} for i in range(2000)}
    flat = treepath.flatten(tree)
    assert len(flat) == 6000
    assert list(flat)[:3] == ["l0/b/0", "l0/b/1", "l0/w"]
