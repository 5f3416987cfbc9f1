"""Tests for jaxckpt.graft: buckets, rules, strict errors, laziness, sharding."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxckpt.grafting.adapters import normalize_adapters
from jaxckpt.grafting.graft import GraftReport, graft, plan
from jaxckpt.grafting.mapping import normalize_mapping

SDS = jax.ShapeDtypeStruct


class LazyLeaf:
    """An on-disk-like array: shape/dtype known, data read only via __array__."""

    def __init__(self, array, readable=True):
        self._array = np.asarray(array)
        self.shape, self.dtype = self._array.shape, self._array.dtype
        self.readable = readable
        self.reads = 0

    def __array__(self, dtype=None, copy=None):
        assert self.readable, "this leaf must not be read"
        self.reads += 1
        return self._array if dtype is None else self._array.astype(dtype)


def _fresh():
    return {
        "encoder": {"kernel": jnp.zeros((4, 3)), "bias": jnp.zeros(3)},
        "head": {"kernel": jnp.zeros((3, 5)), "bias": jnp.zeros(5)},
    }


def _pretrained():
    return {
        "encoder": {"kernel": np.full((4, 3), 1.0, np.float32),
                    "bias": np.full(3, 2.0, np.float32)},
        "head": {"kernel": np.full((3, 2), 3.0, np.float32),
                 "bias": np.full(2, 4.0, np.float32)},
    }


def test_identical_structures_load_everything():
    source = _pretrained()
    target = jax.tree_util.tree_map(jnp.zeros_like, source)
    tree, report = graft(source, target)
    assert report.ok
    assert report.counts == {"loaded": 4, "adapted": 0, "mismatched": 0,
                             "missing": 0, "skipped": 0, "untouched": 0,
                             "unused": 0, "cast": 0}
    np.testing.assert_array_equal(tree["encoder"]["kernel"], np.ones((4, 3)))
    assert isinstance(tree["encoder"]["kernel"], jax.Array)


def test_every_bucket():
    source = _pretrained()
    source["pooler"] = {"w": np.ones(7, np.float32)}
    source["encoder"]["bias"] = source["encoder"]["bias"].astype(np.float16)
    target = _fresh()
    target["encoder"]["extra"] = jnp.zeros(2)
    target["head"]["scale"] = jnp.zeros(5)
    target["head"]["pos"] = jnp.zeros((4, 2))
    source["head"]["pos"] = np.ones((2, 2), np.float32)
    tree, report = graft(source, target, skip=["head/scale"],
                         adapters={"head/pos": "resize"}, strict=False)

    def paths(bucket):
        return sorted(e.path for e in getattr(report, bucket))

    assert paths("loaded") == ["encoder/bias", "encoder/kernel"]
    assert paths("mismatched") == ["head/bias", "head/kernel"]
    assert paths("missing") == ["encoder/extra"]
    assert paths("skipped") == ["head/scale"]
    assert paths("adapted") == ["head/pos"]
    assert paths("unused") == ["pooler/w"]
    assert paths("cast") == ["encoder/bias"]
    assert report.untouched == ()
    assert not report.ok
    mismatch = {e.path: e for e in report.mismatched}["head/kernel"]
    assert (mismatch.source_shape, mismatch.target_shape) == ((3, 2), (3, 5))
    # Mismatched leaves keep the fresh value at the target shape.
    assert tree["head"]["kernel"].shape == (3, 5)
    assert float(jnp.abs(tree["head"]["kernel"]).sum()) == 0.0
    # Casts keep the target dtype and report both.
    assert tree["encoder"]["bias"].dtype == jnp.float32
    cast = report.cast[0]
    assert (cast.source_dtype, cast.target_dtype) == ("float16", "float32")
    np.testing.assert_array_equal(tree["head"]["pos"],
                                  [[1, 1], [1, 1], [0, 0], [0, 0]])


def test_strict_error_lists_every_problem_with_shapes_and_advice():
    source = _pretrained()
    source["pooler"] = {"w": np.ones(7, np.float32)}
    target = _fresh()
    target["encoder"]["extra"] = jnp.zeros(2)
    with pytest.raises(ValueError) as info:
        graft(source, target)
    message = str(info.value)
    for expected in ["head/kernel", "(3, 2)", "(3, 5)", "head/bias", "(2,)",
                     "(5,)", "encoder/extra", "pooler/w", "(7,)",
                     "strict=False", "mapping=", "skip=", "1 missing",
                     "2 mismatched", "1 unused"]:
        assert expected in message, expected


def test_strict_error_is_raised_before_any_read():
    source = {"a": LazyLeaf(np.ones(2), readable=False),
              "b": LazyLeaf(np.ones(3), readable=False)}
    with pytest.raises(ValueError, match="mismatched"):
        graft(source, {"a": jnp.zeros(2), "b": jnp.zeros(4)})


def test_mapping_renames_and_leaves_the_rest_untouched():
    source = {"bert": {"layer": {"w": np.ones(3, np.float32)}},
              "cls": {"w": np.ones(9, np.float32)}}
    target = {"encoder": {"layer": {"w": jnp.zeros(3)}},
              "head": {"w": jnp.zeros(2)}}
    tree, report = graft(source, target, mapping={"bert": "encoder"})
    assert report.ok
    assert [(e.path, e.source) for e in report.loaded] == [
        ("encoder/layer/w", "bert/layer/w")]
    assert [e.path for e in report.untouched] == ["head/w"]
    # Out-of-scope source leaves are not unused.
    assert report.unused == ()
    np.testing.assert_array_equal(tree["encoder"]["layer"]["w"], np.ones(3))
    assert "  loaded     encoder/layer/w  bert/layer/w  (3,)\n" in str(report)


def test_mapping_most_specific_destination_wins():
    source = {"a": {"w": np.ones(2)}, "b": {"w": np.full(2, 5.0)}}
    target = {"a": {"w": np.zeros(2)}, "x": {"w": np.zeros(2)}}
    tree, report = graft(source, target, mapping={"": "", "b": "x"},
                         strict=False)
    np.testing.assert_array_equal(tree["x"]["w"], [5.0, 5.0])
    np.testing.assert_array_equal(tree["a"]["w"], [1.0, 1.0])
    # "b/w" fed "x/w"; nothing maps onto source "x/...".
    assert report.unused == ()
    assert report.missing == ()


def test_sources_in_another_order_than_the_targets():
    # Swapped prefixes put each source far from the last one found; the list
    # then lines up leaf for leaf until the target's extra leaf.
    source = {"a": {"w": np.full(2, 1.0), "v": np.full(2, 2.0)},
              "z": {"w": np.full(2, 3.0)}, "m": [np.full(2, 4.0)] * 11}
    target = {"a": {"w": np.zeros(2)}, "z": {"v": np.zeros(2), "w": np.zeros(2)},
              "m": [np.zeros(2)] * 12}
    tree, report = graft(source, target, mapping={"a": "z", "z": "a", "m": "m"},
                         strict=False)
    np.testing.assert_array_equal(tree["a"]["w"], [3.0, 3.0])
    np.testing.assert_array_equal(tree["z"]["v"], [2.0, 2.0])
    np.testing.assert_array_equal(tree["z"]["w"], [1.0, 1.0])
    assert [e.source for e in report.loaded] == [
        "z/w", *[f"m/{i}" for i in range(11)], "a/v", "a/w"]
    assert [e.path for e in report.missing] == ["m/11"]
    assert report.unused == ()


@pytest.mark.parametrize("mapping, expected", [
    ({"bert": "encoder"}, (("bert", "encoder"),)),
    ({" bert/ ": " encoder ", "cls": "head"}, (("bert", "encoder"), ("cls", "head"))),
    ({"": "backbone"}, (("", "backbone"),)),
    ({}, ()),
    (None, None),
    ({"a/b": "c"}, (("a/b", "c"),)),
])
def test_normalize_mapping(mapping, expected):
    assert normalize_mapping(mapping) == expected


@pytest.mark.parametrize("mapping, error", [
    ({"a": "x", "a/": "y"}, "source prefix"),
    ({"a": "x", "b": "x"}, "target prefix"),
])
def test_normalize_mapping_errors(mapping, error):
    with pytest.raises(ValueError, match=error):
        normalize_mapping(mapping)


@pytest.mark.parametrize("mapping", ["bert:encoder", [("bert", "encoder")], {"bert": 1}])
def test_mapping_is_a_dict_of_prefixes_and_a_string_names_its_parser(mapping):
    with pytest.raises(TypeError, match="mapping|Mapping rule") as info:
        graft({"bert": np.ones(2)}, {"encoder": jnp.zeros(2)}, mapping=mapping)
    if isinstance(mapping, str):
        assert "{'encoder': 'backbone'}" in str(info.value)
        assert "jaxckpt.config_strings.parse_mapping" in str(info.value)


def test_rules_that_match_nothing_are_errors_even_when_not_strict():
    source, target = _pretrained(), _fresh()
    with pytest.raises(ValueError) as info:
        graft(source, target, mapping={"bret": "encoder", "encoder": "decoder"},
              strict=False)
    message = str(info.value)
    assert "'bret':'encoder' matches no source path" in message
    assert "'encoder':'decoder' matches no target path" in message
    with pytest.raises(ValueError, match="skip pattern 'haed' matches no"):
        graft(source, target, skip=["head", "haed"], strict=False)
    with pytest.raises(ValueError, match="adapter rule 'nope' matches no"):
        graft(source, target, adapters={"nope": "resize"}, strict=False)
    # A skip for a target outside the mapped destinations has no effect either.
    with pytest.raises(ValueError, match="skip pattern 'head'"):
        graft(source, target, mapping={"encoder": "encoder"}, skip=["head"])


def test_skip_is_a_regex_over_paths_or_subtrees():
    source, target = _pretrained(), _fresh()
    _, report = graft(source, target, skip=[".*/bias", "head"], strict=False)
    assert sorted((e.path, e.rule) for e in report.skipped) == [
        ("encoder/bias", ".*/bias"), ("head/bias", ".*/bias"),
        ("head/kernel", "head")]
    assert report.ok  # The skipped head's source leaves count as used.
    with pytest.raises(TypeError, match="Wrap it in a list"):
        graft(source, target, skip="head")


def test_abstract_trees_give_the_plan_without_reading():
    source = {"w": LazyLeaf(np.ones((2, 3)), readable=False),
              "v": LazyLeaf(np.ones(4), readable=False)}
    target = {"w": SDS((2, 3), jnp.bfloat16), "v": SDS((5,), jnp.float32)}
    tree, report = graft(source, target, strict=False)
    assert tree == target
    assert [e.path for e in report.loaded] == ["w"]
    assert [e.path for e in report.mismatched] == ["v"]
    assert [(e.path, e.target_dtype) for e in report.cast] == [("w", "bfloat16")]
    assert plan(source, target) == report
    # Fully abstract on both sides works too.
    abstract = jax.tree_util.tree_map(lambda x: SDS(x.shape, x.dtype), source)
    _, report2 = graft(abstract, target, strict=False)
    assert report2 == report


def test_only_needed_leaves_are_read():
    source = {"enc": LazyLeaf(np.ones(3)),
              "head": LazyLeaf(np.ones(2), readable=False),
              "skip": LazyLeaf(np.ones(4), readable=False)}
    target = {"enc": jnp.zeros(3), "head": jnp.zeros(5), "skip": jnp.zeros(4)}
    tree, report = graft(source, target, skip=["skip"], strict=False)
    assert source["enc"].reads == 1
    np.testing.assert_array_equal(tree["enc"], np.ones(3))
    assert [e.path for e in report.mismatched] == ["head"]


def test_callable_source_leaves():
    calls = []

    def reader():
        calls.append(1)
        return np.arange(3.0)

    reader.shape, reader.dtype = (3,), np.dtype("float64")
    tree, _ = graft({"a": reader, "b": lambda: np.ones(2)},
                    {"a": jnp.zeros(3), "b": jnp.zeros(2)})
    assert calls == [1]
    np.testing.assert_array_equal(tree["a"], [0.0, 1.0, 2.0])
    assert tree["a"].dtype == jnp.float32
    np.testing.assert_array_equal(tree["b"], [1.0, 1.0])


def test_abstract_source_into_concrete_target_is_a_type_error():
    with pytest.raises(TypeError, match="'w'.*abstract"):
        graft({"w": SDS((2,), jnp.float32)}, {"w": jnp.zeros(2)})


def test_flat_source_dict():
    flat = {"encoder/kernel": np.ones((4, 3), np.float32),
            "encoder/bias": np.ones(3, np.float32)}
    tree, report = graft(flat, _fresh(), mapping={"encoder": "encoder"})
    assert report.ok and len(report.loaded) == 2
    np.testing.assert_array_equal(tree["encoder"]["bias"], np.ones(3))


def test_numpy_and_scalar_targets_keep_dtype():
    tree, _ = graft({"a": np.ones(2, np.float64), "n": 3.0},
                    {"a": np.zeros(2, np.float32), "n": np.int32(0)})
    assert tree["a"].dtype == np.float32
    assert tree["n"].dtype == np.int32 and int(tree["n"]) == 3


def test_resize_grows_and_shrinks_every_axis():
    source = {"emb": np.arange(6.0, dtype=np.float32).reshape(3, 2),
              "cls": np.arange(4.0, dtype=np.float32)}
    target = {"emb": jnp.full((5, 1), -1.0), "cls": jnp.full(2, -1.0)}
    tree, report = graft(source, target, adapters={"emb": "resize", "cls": "resize"})
    np.testing.assert_array_equal(tree["emb"], [[0], [2], [4], [-1], [-1]])
    np.testing.assert_array_equal(tree["cls"], [0, 1])
    assert {(e.path, e.source_shape, e.target_shape, e.rule)
            for e in report.adapted} == {("emb", (3, 2), (5, 1), "resize"),
                                         ("cls", (4,), (2,), "resize")}
    assert report.ok


def test_interpolate_is_linear_along_changed_axes_only():
    source = {"pos": np.stack([np.linspace(0.0, 3.0, 4),
                               np.linspace(10.0, 13.0, 4)], axis=1)}  # (4, 2)
    target = {"pos": jnp.zeros((8, 2))}
    tree, report = graft(source, target, adapters={"pos": "interpolate"})
    # Half-pixel centres: output i samples input position (i + .5) / 2 - .5.
    positions = (np.arange(8) + 0.5) / 2 - 0.5
    expected = np.stack([np.interp(positions, np.arange(4), source["pos"][:, k])
                         for k in range(2)], axis=1)
    np.testing.assert_allclose(tree["pos"], expected, rtol=1e-6)
    assert report.adapted[0].rule == "interpolate"


def test_callable_adapter_and_its_shape_check():
    def tile(src, target_leaf):
        return np.resize(np.asarray(src), target_leaf.shape)

    tree, report = graft({"w": np.arange(2.0)}, {"w": jnp.zeros(5)},
                         adapters={"w": tile})
    np.testing.assert_array_equal(tree["w"], [0, 1, 0, 1, 0])
    assert report.adapted[0].rule == "tile"
    with pytest.raises(ValueError, match=r"returned shape \(2,\).*\(5,\)"):
        graft({"w": np.arange(2.0)}, {"w": jnp.zeros(5)},
              adapters={"w": lambda s, t: s})


def test_adapter_errors():
    with pytest.raises(ValueError, match="unknown"):
        normalize_adapters({"w": "pad"})
    with pytest.raises(TypeError, match="jaxckpt.config_strings.parse_adapters"):
        graft({"w": np.ones(4)}, {"w": jnp.zeros(2)}, adapters="w:resize")
    with pytest.raises(ValueError, match="number of axes"):
        graft({"w": np.ones(4)}, {"w": jnp.zeros((2, 2))},
              adapters={"w": "resize"})


def test_adapter_only_applies_to_mismatched_leaves():
    tree, report = graft({"w": np.ones(3), "b": np.ones(2)},
                         {"w": jnp.zeros(3), "b": jnp.zeros(2)},
                         adapters={".*": "resize"})
    assert report.adapted == () and len(report.loaded) == 2


def test_report_str_and_json():
    source = {f"l{i}": np.ones(2, np.float32) for i in range(30)}
    source["x"] = np.ones(3, np.float32)
    target = {f"l{i}": jnp.zeros(2) for i in range(30)}
    target["x"] = jnp.zeros(4)
    target["y"] = jnp.zeros(1)
    _, report = graft(source, target, strict=False)
    text = str(report)
    assert "\nloaded 30     copied from the source\n" in text
    assert "\nmismatched 1  shapes differ: kept fresh\n" in text
    assert "  loaded      ...   and 20 more\n" in text
    assert "  mismatched  x     source (3,) -> target (4,)\n" in text
    assert "  missing     y     target (1,), no source leaf\n" in text
    data = json.loads(json.dumps(report.to_dict()))
    assert data["counts"]["missing"] == 1 and data["ok"] is False
    assert data["mismatched"][0]["source_shape"] == [3]
    assert isinstance(report, GraftReport)
    with pytest.raises(Exception):
        report.loaded = ()  # Frozen.


def test_sharded_targets_keep_their_sharding():
    if len(jax.devices()) < 4:
        pytest.skip("needs 4 devices (XLA_FLAGS=--xla_force_host_platform_device_count=4)")
    mesh = Mesh(np.array(jax.devices()[:4]).reshape(2, 2), ("data", "model"))
    sharding = NamedSharding(mesh, P("data", "model"))
    target = {"w": jax.device_put(jnp.zeros((4, 4), jnp.bfloat16), sharding),
              "pos": jax.device_put(jnp.zeros((8, 2)), NamedSharding(mesh, P("data")))}
    source = {"w": np.arange(16.0, dtype=np.float32).reshape(4, 4),
              "pos": np.ones((4, 2), np.float32)}
    tree, report = graft(source, target, adapters={"pos": "interpolate"})
    assert tree["w"].sharding == target["w"].sharding
    assert tree["w"].dtype == jnp.bfloat16
    assert tree["pos"].sharding == target["pos"].sharding
    np.testing.assert_array_equal(np.asarray(tree["w"], np.float32),
                                  source["w"])
    np.testing.assert_allclose(np.asarray(tree["pos"]), np.ones((8, 2)))
    assert [e.path for e in report.cast] == ["w"]


def test_mapping_a_subtree_onto_the_root():
    # E.g. the params of a saved train state onto a bare params tree.
    saved = {"params": _pretrained(), "opt_state": {"mu": np.ones(3)}, "step": 7}
    target = jax.tree_util.tree_map(jnp.zeros_like, _pretrained())
    tree, report = graft(saved, target, mapping={"params": ""})
    assert report.ok and len(report.loaded) == 4
    assert report.loaded[0].source.startswith("params/")
    np.testing.assert_array_equal(tree["head"]["bias"], [4.0, 4.0])


def test_report_str_is_an_aligned_table_with_a_source_column_only_when_renamed():
    source = {"bert": {"w": np.ones(2, np.float32), "extra": np.ones((3, 3), np.float32)}}
    target = {"encoder": {"w": jnp.zeros(2, jnp.bfloat16), "new": jnp.zeros(4)},
              "head": {"kernel": jnp.zeros((2, 5))}}
    _, report = graft(source, target, mapping={"bert": "encoder"}, strict=False)
    lines = str(report).splitlines()
    assert lines[:6] == [
        "GraftReport",
        "  bucket     path         source    shapes",
        "  loaded     encoder/w    bert/w    (2,)",
        "  missing    encoder/new  bert/new  target (4,), no source leaf",
        "  untouched  head/kernel            (2, 5)",
        "  unused     bert/extra             source (3, 3), no target leaf",
    ]
    assert lines[6] == "  cast       encoder/w    bert/w    float32 -> bfloat16"
    # One line per bucket, in bucket order, the counts aligned.
    assert [line.split()[:2] for line in lines[7:]] == [
        [name, str(n)] for name, n in report.counts.items()]
    assert len({line.index(line.split()[2]) for line in lines[7:]}) == 1
    # Without renames there is no source column.
    _, report = graft({"w": np.ones(2)}, {"w": jnp.zeros(2)})
    assert str(report).splitlines()[1:3] == ["  bucket  path  shapes", "  loaded  w     (2,)"]
