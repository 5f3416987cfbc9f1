"""Structural adapters (jaxckpt/grafting/structure.py) through `graft`, `plan` and `load_params`:
both directions, bitwise; what the report says; what is read; and the errors."""

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from jaxckpt.grafting.graft import graft, plan
from jaxckpt.grafting.structure import Derived, Fuse, Split, Stack, Unstack, restructure
from jaxckpt.tree import treepath
from jaxckpt.weights.pretrained import load_params

RNG = np.random.default_rng(0)
QKV = ("h_{i}/attention/query/kernel", "h_{i}/attention/key/kernel", "h_{i}/attention/value/kernel")


def _fused(layers=2, width=4):
    return {f"h_{i}": {"c_attn": {"kernel": RNG.normal(size=(width, 3 * width)).astype(np.float32)}}
            for i in range(layers)}


def _split_target(layers=2, width=4):
    return {f"h_{i}": {"attention": {name: {"kernel": np.zeros((width, width), np.float32)}
                                     for name in ("query", "key", "value")}} for i in range(layers)}


def test_split_then_fuse_is_bitwise_and_reported():
    source = _fused()
    split, report = graft(source, _split_target(), structure=[Split("h_{i}/c_attn/kernel", QKV, 1)])
    for i in range(2):
        fused = source[f"h_{i}"]["c_attn"]["kernel"]
        for k, name in enumerate(("query", "key", "value")):
            np.testing.assert_array_equal(split[f"h_{i}"]["attention"][name]["kernel"],
                                          fused[:, 4 * k:4 * (k + 1)])
    assert report.ok and report.counts["loaded"] == 6
    rules = {e.path: e.rule for e in report.loaded}
    assert rules["h_1/attention/key/kernel"] == "split 3 on axis 1 of h_1/c_attn/kernel (part 1)"
    assert "h_1/attention/key/kernel" in str(report) and "by split 3 on axis 1" in str(report)

    back, report = graft(split, treepath.unflatten_dict(
        {f"h_{i}/c_attn/kernel": np.zeros((4, 12), np.float32) for i in range(2)}),
        structure=[Fuse(QKV, "h_{i}/c_attn/kernel", 1)])
    for i in range(2):
        assert back[f"h_{i}"]["c_attn"]["kernel"].tobytes() == \
            source[f"h_{i}"]["c_attn"]["kernel"].tobytes()
    assert report.loaded[0].rule.startswith("fuse on axis 1 of h_0/attention/query/kernel, ")


def test_stack_then_unstack_is_bitwise_and_reported():
    layers = {f"layer_{i}": {"dense": {"kernel": RNG.normal(size=(3, 5)).astype(np.float32),
                                       "bias": RNG.normal(size=5).astype(np.float32)}}
              for i in range(4)}
    source = {"encoder": layers}
    target = {"encoder": {"layers": {"dense": {"kernel": np.zeros((4, 3, 5), np.float32),
                                               "bias": np.zeros((4, 5), np.float32)}}}}
    stacked, report = graft(source, target, structure=[Stack("encoder/layer_{i}", "encoder/layers")])
    np.testing.assert_array_equal(stacked["encoder"]["layers"]["dense"]["kernel"][2],
                                  layers["layer_2"]["dense"]["kernel"])
    assert report.ok
    assert {e.rule for e in report.loaded} == {
        "stack on axis 0 of encoder/layer_{0..3}/dense/bias",
        "stack on axis 0 of encoder/layer_{0..3}/dense/kernel"}

    back, report = graft(stacked, jax.tree.map(np.zeros_like, source),
                         structure=[Unstack("encoder/layers", "encoder/layer_{i}")])
    for path, leaf in treepath.flatten(source).items():
        assert treepath.flatten(back)[path].tobytes() == leaf.tobytes(), path
    assert report.counts["loaded"] == 8
    assert "unstack layer 3 on axis 0 of encoder/layers/dense/kernel" in {e.rule for e in report.loaded}


def test_stack_on_another_axis_and_rules_in_sequence():
    source = {f"b_{i}": {"qkv": np.full((2, 6), i, np.float32)} for i in range(3)}
    rules = [Split("b_{i}/qkv", ("b_{i}/q", "b_{i}/k", "b_{i}/v"), 1), Stack("b_{i}", "blocks", axis=1)]
    flat = restructure(treepath.flatten(source), rules)
    assert sorted(flat) == ["blocks/k", "blocks/q", "blocks/v"]
    assert flat["blocks/k"].shape == (2, 3, 2)
    np.testing.assert_array_equal(flat["blocks/k"]()[:, :, 0], [[0, 1, 2], [0, 1, 2]])


def test_plan_reads_nothing_and_graft_reads_only_what_it_loads():
    reads = []

    class Spy:
        def __init__(self, path, array):
            self.path, self.array, self.shape, self.dtype = path, array, array.shape, array.dtype

        def __array__(self, dtype=None, copy=None):
            reads.append(self.path)
            return self.array

    source = {f"h_{i}/c_attn/kernel": Spy(f"h_{i}", leaf["c_attn"]["kernel"])
              for i, leaf in enumerate(_fused().values())}
    rules = [Split("h_{i}/c_attn/kernel", QKV, 1)]
    report = plan(source, _split_target(), structure=rules)
    assert report.ok and reads == []
    _, report = graft(source, _split_target(), structure=rules, skip=["h_1"])
    assert report.counts["skipped"] == 3
    assert reads == ["h_0"]  # Once for its three parts; h_1's parts are skipped, so never read.


def test_split_onto_abstract_targets_is_a_plan():
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), _split_target())
    tree, report = graft(_fused(), abstract, structure=[Split("h_{i}/c_attn/kernel", QKV, 1)])
    assert report.ok and isinstance(tree["h_0"]["attention"]["query"]["kernel"], jax.ShapeDtypeStruct)
    abstract_source = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), _fused())
    with pytest.raises(TypeError, match="abstract"):
        graft(abstract_source, _split_target(), structure=[Split("h_{i}/c_attn/kernel", QKV, 1)])


def test_mismatched_split_is_reported_with_its_rule_and_resize_can_adapt_it():
    target = _split_target(width=4)
    target["h_0"]["attention"]["query"]["kernel"] = np.zeros((4, 6), np.float32)
    rules = [Split("h_{i}/c_attn/kernel", QKV, 1)]
    report = plan(_fused(), target, structure=rules)
    assert [e.path for e in report.mismatched] == ["h_0/attention/query/kernel"]
    assert report.mismatched[0].rule.startswith("split 3 on axis 1 of h_0/c_attn/kernel")
    _, report = graft(_fused(), target, structure=rules, adapters={"h_0/attention/query": "resize"})
    assert report.adapted[0].rule.endswith(", then resize")


@pytest.mark.parametrize("rules, match", [
    ([Split("h_{i}/c_atn/kernel", QKV, 1)], "matches no source path"),
    ([Split("h_{i}/c_attn/kernel", QKV + ("h_{i}/x", "h_{i}/y"), 1)],
     r"\(12\) does not cut into 5 equal parts"),
    ([Split("h_{i}/c_attn/kernel", QKV, 2)], "axis 2 is out of range"),
    ([Stack("h", "layers")], "exactly one placeholder"),
    ([Fuse(("h_{i}/c_attn/kernel", "h_{i}/other"), "h_{i}/both", 1)], r"\['h_0/other'\] are not in"),
    (["h:split"], "not a Split, Fuse, Stack or Unstack"),
])
def test_bad_rules_name_the_culprit(rules, match):
    with pytest.raises(ValueError, match=match):
        graft(_fused(), _split_target(), structure=rules)


def test_stack_refuses_gaps_and_ragged_layers():
    gap = {"layer_0/w": np.zeros(2), "layer_2/w": np.zeros(2)}
    with pytest.raises(ValueError, match=r"layers \[0, 2\]; a stack needs layers 0..1"):
        restructure(gap, [Stack("layer_{i}", "layers")])
    ragged = {"layer_0/w": np.zeros(2), "layer_1/w": np.zeros(3)}
    with pytest.raises(ValueError, match="layer shapes differ"):
        restructure(ragged, [Stack("layer_{i}", "layers")])


def test_derived_path_that_exists_is_refused():
    with pytest.raises(ValueError, match="already holds"):
        restructure({"a": np.zeros(4), "b": np.zeros(2)}, [Split("a", ("b", "c"), 0)])


def test_load_params_from_an_orbax_tree_with_structure(tmp_path):
    source = _fused()
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(tmp_path / "fused", source)
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), _split_target())
    params, report = load_params(tmp_path / "fused", abstract,
                                 structure=[Split("h_{i}/c_attn/kernel", QKV, 1)])
    assert report.ok and all(e.rule for e in report.loaded)
    assert isinstance(params["h_1"]["attention"]["value"]["kernel"], jax.Array)
    np.testing.assert_array_equal(params["h_1"]["attention"]["value"]["kernel"],
                                  source["h_1"]["c_attn"]["kernel"][:, 8:])


def test_derived_leaf_describes_itself():
    leaf = restructure({"a": np.zeros((2, 4), np.float16)}, [Split("a", ("b", "c"), -1)])["b"]
    assert isinstance(leaf, Derived) and leaf.shape == (2, 2) and leaf.dtype == np.float16
    assert leaf.inputs == ("a",) and leaf.input_shape == (2, 4) and not leaf.abstract


def test_parse_structure_reads_the_config_form():
    from jaxckpt.grafting.structure import parse_structure
    assert parse_structure("") == ()
    rules = parse_structure(" split h_{i}/c_attn/kernel => " + ", ".join(QKV) + " @ 1 ;"
                            "fuse a, b => ab @ -1; stack enc/layer_{i} => enc/layers;"
                            "unstack enc/layers => enc/layer_{i} @ 0")
    assert rules == (Split("h_{i}/c_attn/kernel", QKV, 1), Fuse(("a", "b"), "ab", -1),
                     Stack("enc/layer_{i}", "enc/layers", 0), Unstack("enc/layers", "enc/layer_{i}", 0))


@pytest.mark.parametrize("spec", ["split a => b, c", "fuse a => b @ 0", "stack a, b => c", "resize a => b @ 0",
                                  "split a => b, c @ x", "stack a"])
def test_parse_structure_refuses_malformed_rules(spec):
    from jaxckpt.grafting.structure import parse_structure
    with pytest.raises(ValueError, match="must be one of 'split SRC => DST1, DST2, ... @ AXIS'"):
        parse_structure(spec)


def test_the_config_form_reaches_the_graft_through_checkpoint_structure(tmp_path):
    import ml_collections

    from jaxckpt.errors import UserError
    from jaxckpt.runner.sources import load_pretrained

    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(tmp_path / "fused", _fused())
    ck = ml_collections.ConfigDict({"mapping": "", "skip": "", "strict": True, "adapters": "", "rename": "",
                                    "structure": "split h_{i}/c_attn/kernel => " + ", ".join(QKV) + " @ 1"})
    _, report = load_pretrained(str(tmp_path / "fused"), _split_target(), ck)
    assert report.ok and report.counts["loaded"] == 6
    ck.structure = "split h_{i}/c_attn/kernel => h_{i}/q"
    with pytest.raises(UserError, match="checkpoint.structure="):
        load_pretrained(str(tmp_path / "fused"), _split_target(), ck)


def test_each_split_cuts_its_own_leaf_when_layers_differ_in_width():
    source = {"h_0/qkv": np.arange(12.0).reshape(1, 12), "h_1/qkv": np.arange(6.0).reshape(1, 6)}
    flat = restructure(source, [Split("h_{i}/qkv", ("h_{i}/q", "h_{i}/k", "h_{i}/v"), 1)])
    np.testing.assert_array_equal(flat["h_0/k"](), [[4.0, 5.0, 6.0, 7.0]])
    np.testing.assert_array_equal(flat["h_1/k"](), [[2.0, 3.0]])
