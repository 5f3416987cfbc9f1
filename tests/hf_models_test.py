"""Flax ports of HF BERT, ViT and GPT-2 against PyTorch's outputs on committed tiny checkpoints.

The fixtures under `tests/fixtures/hf/` were written by `tests/fixtures/hf/make_fixtures.py`
(torch + transformers); this test needs neither. Every parameter of the fixtures is drawn at a
large magnitude, and the negative controls below check that a wrong layout or swapped query/key
moves the outputs far beyond the tolerance, so a match means the conversion is right.
"""

import json
import os

import jax
import numpy as np
import pytest
from flax import traverse_util

from experiments.tasks import hf_models
from jaxckpt.weights import hf_presets

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "hf")
ATOL = 1e-5
# Far beyond float32 noise (~1e-6 here): what a wrong conversion must at least move the outputs by.
WRONG = 1e-2
NAMES = ["bert", "bert_sharded", "bert_sequence_classifier", "vit_image_classifier", "gpt2_lm_head"]


@pytest.fixture(autouse=True)
def _highest_precision():
    with jax.default_matmul_precision("highest"):
        yield


def _config(name):
    with open(os.path.join(FIXTURES, name, "config.json")) as f:
        return json.load(f)


def _reference(name):
    """(inputs, output) that PyTorch gave for the fixture."""
    reference = dict(np.load(os.path.join(FIXTURES, name, "reference.npz")))
    return reference, reference.pop("output")


def _apply(module, params, inputs):
    return np.asarray(jax.jit(module.apply)({"params": params}, **inputs))


def _apply_flat(name, flat):
    """The fixture's module applied to flat converted params, on the fixture's inputs."""
    module = hf_models.build(_config(name))
    inputs, _ = _reference(name)
    return _apply(module, traverse_util.unflatten_dict(flat, sep="/"), inputs)


def _tensors(name):
    return hf_models.read_tensors(os.path.join(FIXTURES, name))


def _with_overrides(family, overrides):
    """The family's rules, with `overrides[hf_pattern] = (flax_paths, layout)` in place of some."""
    rules = hf_presets.PRESETS[family].rules
    assert set(overrides) <= {rule[0] for rule in rules}, f"no such rule in {family}"
    return tuple((pattern, *overrides.get(pattern, (paths, layout)))
                 for pattern, paths, layout in rules)


@pytest.mark.parametrize("name", NAMES)
def test_load_matches_pytorch(name):
    module, params = hf_models.load("hf:" + os.path.join(FIXTURES, name))
    inputs, expected = _reference(name)
    np.testing.assert_allclose(_apply(module, params, inputs), expected, rtol=0, atol=ATOL)


@pytest.mark.parametrize("name", NAMES)
def test_every_tensor_used_and_every_leaf_loaded(name):
    family = hf_presets.family_of(_config(name))
    tensors = _tensors(name)
    flat = hf_presets.convert(family, tensors)
    module = hf_models.build(_config(name))
    init = jax.eval_shape(module.init, jax.random.key(0), **hf_models.example_inputs(module))
    expected = traverse_util.flatten_dict(init["params"], sep="/")
    assert {path: flat[path].shape for path in flat} == {p: v.shape for p, v in expected.items()}
    # Nothing in the file is dropped: the inverse rebuilds every tensor from the converted ones.
    assert sorted(hf_presets.to_hf(family, flat)) == sorted(tensors)


@pytest.mark.parametrize("name", NAMES)
def test_round_trip_is_bitwise(name):
    family = hf_presets.family_of(_config(name))
    tensors = _tensors(name)
    back = hf_presets.to_hf(family, hf_presets.convert(family, tensors))
    assert sorted(back) == sorted(tensors)
    for key, tensor in tensors.items():
        assert back[key].dtype == tensor.dtype and back[key].shape == tensor.shape, key
        assert back[key].tobytes() == tensor.tobytes(), key


_QKV = tuple(f"transformer/h_{{i}}/attention/{name}/kernel" for name in ("key", "query", "value"))
# Each wrong table must move the outputs by far more than the tolerance: the test proves that it
# would see the mistake. Values: (family, {hf_pattern: (flax_paths, layout)}).
WRONG_TABLES = {
    "bert: square attention output not transposed": ("bert", {
        "encoder.layer.{i}.attention.output.dense.weight":
            ("encoder/layer_{i}/attention/output/kernel", "none")}),
    "bert: query and key swapped": ("bert", {
        "encoder.layer.{i}.attention.self.query.weight":
            ("encoder/layer_{i}/attention/key/kernel", "transpose"),
        "encoder.layer.{i}.attention.self.key.weight":
            ("encoder/layer_{i}/attention/query/kernel", "transpose")}),
    "vit: square query not transposed": ("vit_image_classifier", {
        "vit.encoder.layer.{i}.attention.attention.query.weight":
            ("vit/encoder/layer_{i}/attention/query/kernel", "none")}),
    "gpt2: square Conv1D c_proj transposed": ("gpt2_lm_head", {
        "transformer.h.{i}.attn.c_proj.weight":
            ("transformer/h_{i}/attention/output/kernel", "transpose")}),
    "gpt2: query and key swapped in c_attn": ("gpt2_lm_head", {
        "transformer.h.{i}.attn.c_attn.weight": (_QKV, ("split", 3, 1))}),
}


@pytest.mark.parametrize("case", sorted(WRONG_TABLES))
def test_wrong_table_changes_outputs(case):
    name, overrides = WRONG_TABLES[case]
    flat = hf_presets.convert(name, _tensors(name), rules=_with_overrides(name, overrides))
    _, expected = _reference(name)
    assert np.abs(_apply_flat(name, flat) - expected).max() > WRONG


def test_right_table_through_apply_flat_matches():
    """The helper the negative controls use gives the reference with the right table."""
    flat = hf_presets.convert("gpt2_lm_head", _tensors("gpt2_lm_head"))
    _, expected = _reference("gpt2_lm_head")
    np.testing.assert_allclose(_apply_flat("gpt2_lm_head", flat), expected, rtol=0, atol=ATOL)


def test_convert_names_unused_tensors_and_idle_rules():
    tensors = _tensors("bert")
    tensors["encoder.layer.0.attention.self.extra.weight"] = np.zeros((2, 2), np.float32)
    del tensors["pooler.dense.bias"]
    with pytest.raises(ValueError) as error:
        hf_presets.convert("bert", tensors)
    assert "encoder.layer.0.attention.self.extra.weight" in str(error.value)
    assert "pooler.dense.bias" in str(error.value)


def test_convert_ignores_old_buffers():
    tensors = _tensors("gpt2_lm_head")
    tensors["transformer.h.0.attn.bias"] = np.ones((1, 1, 16, 16), np.float32)
    assert "transformer/h_0/attention/query/kernel" in hf_presets.convert("gpt2_lm_head", tensors)


def test_load_rejects_weights_that_do_not_fit_the_config(tmp_path):
    folder = os.path.join(FIXTURES, "bert")
    config = _config("bert")
    config["intermediate_size"] = 48
    (tmp_path / "config.json").write_text(json.dumps(config))
    os.symlink(os.path.join(folder, "model.safetensors"), tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match="encoder/layer_0/intermediate/kernel"):
        hf_models.load(str(tmp_path))


def test_family_of_rejects_unknown_architectures():
    with pytest.raises(ValueError, match="BertForMaskedLM"):
        hf_presets.family_of({"model_type": "bert", "architectures": ["BertForMaskedLM"]})


def test_dropout_runs_only_when_not_deterministic():
    module, params = hf_models.load(os.path.join(FIXTURES, "gpt2_lm_head"))
    inputs, expected = _reference("gpt2_lm_head")
    dropped = module.apply({"params": params}, **inputs, deterministic=False,
                           rngs={"dropout": jax.random.key(0)})
    assert np.abs(np.asarray(dropped) - expected).max() > WRONG


def test_sequences_longer_than_the_position_table_are_refused():
    module, params = hf_models.load(os.path.join(FIXTURES, "bert"))
    with pytest.raises(ValueError, match="at most 16 positions"):
        module.apply({"params": params}, input_ids=np.ones((1, 17), np.int32))
