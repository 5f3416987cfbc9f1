"""Tests for jaxckpt.pathmatch: glob and regex patterns over tree paths, first-match labels."""

import jax
import jax.numpy as jnp
import optax
import pytest

from jaxckpt.tree import pathmatch

PATHS = ["encoder/layer_0/kernel", "encoder/layer_0/bias",
         "encoder/layer_10/kernel", "lm_head/kernel", "head/kernel",
         "head/bias"]


@pytest.mark.parametrize("pattern, expected", [
    ("head", ["head/kernel", "head/bias"]),
    ("*/kernel", ["lm_head/kernel", "head/kernel"]),
    ("**/kernel", ["encoder/layer_0/kernel", "encoder/layer_10/kernel",
                   "lm_head/kernel", "head/kernel"]),
    ("encoder/**", PATHS[:3]),
    ("encoder/layer_?", ["encoder/layer_0/kernel", "encoder/layer_0/bias"]),
    ("*head", ["lm_head/kernel", "head/kernel", "head/bias"]),
    ("head/ker", []),
    ("re:.*/bias", ["encoder/layer_0/bias", "head/bias"]),
    ("re:encoder/layer_\\d+/kernel", ["encoder/layer_0/kernel",
                                       "encoder/layer_10/kernel"]),
    ("re:encoder/layer_1", []),
    ("re:(lm_)?head", ["lm_head/kernel", "head/kernel", "head/bias"]),
])
def test_glob_and_regex_matching(pattern, expected):
    assert pathmatch.match(PATHS, pattern) == expected


def test_syntax_default_and_prefix_override():
    # ".*" is a regex by default there but a literal name in a glob.
    assert pathmatch.match(PATHS, ".*/bias", syntax="regex") == [
        "encoder/layer_0/bias", "head/bias"]
    assert pathmatch.match(PATHS, ".*/bias") == []
    assert pathmatch.match(PATHS, "glob:*/bias", syntax="regex") == ["head/bias"]


def test_bad_patterns():
    with pytest.raises(ValueError, match="not a valid regex"):
        pathmatch.compile_pattern("re:(")
    with pytest.raises(ValueError, match="Empty path pattern"):
        pathmatch.compile_pattern("")
    with pytest.raises(ValueError, match="Unknown pattern syntax"):
        pathmatch.compile_pattern("a", syntax="fnmatch")
    with pytest.raises(TypeError, match="wrap it in a list"):
        pathmatch.PathMatcher("head")


def test_matcher_first_match_and_unmatched():
    matcher = pathmatch.PathMatcher(["head", "*/kernel", "decoder"])
    assert matcher.first("head/kernel") == 0
    assert matcher.first("lm_head/kernel") == 1
    assert matcher.first("encoder/layer_0/bias") is None
    assert matcher.unmatched(PATHS) == ["decoder"]
    assert pathmatch.unmatched_patterns(PATHS, ["head", "nope"]) == ["nope"]


def test_label_tree_first_rule_wins_and_fits_multi_transform():
    params = {"encoder": {"kernel": jnp.ones((2, 2)), "bias": jnp.ones(2)},
              "head": {"kernel": jnp.ones((2, 1))}}
    labels = pathmatch.label_tree(
        params, [("head", "train"), ("*/kernel", "frozen")], "train")
    assert labels == {"encoder": {"kernel": "frozen", "bias": "train"},
                      "head": {"kernel": "train"}}
    tx = optax.multi_transform(
        {"train": optax.sgd(1.0), "frozen": optax.set_to_zero()}, labels)
    grads = jax.tree_util.tree_map(jnp.ones_like, params)
    updates, _ = tx.update(grads, tx.init(params), params)
    assert float(updates["encoder"]["kernel"].sum()) == 0.0
    assert float(updates["head"]["kernel"].sum()) == -2.0


def test_label_tree_without_default_names_unlabelled_paths():
    with pytest.raises(ValueError, match="'b'"):
        pathmatch.label_tree({"a": 1, "b": 2}, {"a": "x"}, None)
