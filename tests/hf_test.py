"""`hf:DIR` as a weights source and `export_hf` (jaxckpt/weights/hf.py), on the committed tiny HF
fixtures: strict grafts with every leaf reported, lazy reads, sharded and `.bin` folders, and the
round trip jaxckpt -> HF folder -> jaxckpt, bitwise. The check that transformers loads an export
with the same outputs runs only where torch and transformers are installed."""

import json
import os
import shutil

import jax
import numpy as np
import pytest

from experiments.tasks import hf_models
from jaxckpt.errors import CheckpointNotFoundError
from jaxckpt.tree import treepath
from jaxckpt.weights import hf, hf_presets, tensor_files
from jaxckpt.weights.pretrained import load_params

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "hf")
NAMES = ["bert", "bert_sharded", "bert_sequence_classifier", "vit_image_classifier", "gpt2_lm_head"]


def _abstract(name):
    module = hf_models.build(hf.read_config(os.path.join(FIXTURES, name)))
    return module, jax.eval_shape(module.init, jax.random.key(0),
                                  **hf_models.example_inputs(module))["params"]


@pytest.fixture
def reads(monkeypatch):
    """The HF keys read from safetensors files, in order."""
    seen = []
    original = tensor_files._safetensors_reader

    def spy(safetensors, path, key):
        read = original(safetensors, path, key)

        def counted():
            seen.append(key)
            return read()
        return counted
    monkeypatch.setattr(tensor_files, "_safetensors_reader", spy)
    return seen


@pytest.mark.parametrize("name", NAMES)
def test_hf_source_grafts_strictly_and_equals_the_eager_conversion(name):
    _, abstract = _abstract(name)
    params, report = load_params("hf:" + os.path.join(FIXTURES, name), abstract)
    assert report.ok and report.counts["loaded"] == len(treepath.flatten(abstract))
    family = hf_presets.family_of(hf.read_config(os.path.join(FIXTURES, name)))
    eager = hf_presets.convert(family, hf_models.read_tensors(os.path.join(FIXTURES, name)))
    flat = treepath.flatten(params)
    assert sorted(flat) == sorted(eager)
    for path, array in eager.items():
        assert np.asarray(flat[path]).tobytes() == array.tobytes(), path


def test_gpt2_fused_attention_is_split_by_the_graft_and_read_once_per_layer(reads):
    _, abstract = _abstract("gpt2_lm_head")
    _, report = load_params("hf:" + os.path.join(FIXTURES, "gpt2_lm_head"), abstract)
    rules = {e.path: e.rule for e in report.loaded if e.rule}
    assert rules["transformer/h_1/attention/value/kernel"] == \
        "split 3 on axis 1 of transformer.h.1.attn.c_attn.weight (part 2)"
    assert len(rules) == 2 * 6  # two layers, q/k/v kernels and biases
    assert reads.count("transformer.h.1.attn.c_attn.weight") == 1
    assert sorted(reads) == sorted(set(reads))  # every tensor read once


def test_only_the_tensors_the_graft_loads_are_read(reads):
    _, abstract = _abstract("bert_sequence_classifier")
    params, report = load_params("hf:" + os.path.join(FIXTURES, "bert_sequence_classifier"), abstract,
                                 skip=["classifier", "bert/encoder/layer_1"])
    assert report.counts["skipped"] == 2 + 16
    assert not any(key.startswith(("classifier", "bert.encoder.layer.1.")) for key in reads)
    assert "bert.encoder.layer.0.attention.self.query.weight" in reads
    assert isinstance(params["classifier"]["kernel"], jax.ShapeDtypeStruct)  # left to the caller


def test_plan_of_an_hf_source_reads_nothing(reads):
    from jaxckpt.grafting.graft import plan
    source = hf.open_hf("hf:" + os.path.join(FIXTURES, "gpt2_lm_head"))
    _, abstract = _abstract("gpt2_lm_head")
    report = plan(source.leaves, abstract, structure=source.structure)
    assert report.ok and reads == []
    assert source.files == ("model.safetensors",)


def test_sharded_folder_reads_every_shard():
    source = hf.open_hf(os.path.join(FIXTURES, "bert_sharded"))
    assert len(source.files) == 3
    assert {leaf.source.split(":")[0] for leaf in source.leaves.values()} == set(source.files)


@pytest.mark.parametrize("name", NAMES)
def test_export_round_trip_is_bitwise(name, tmp_path):
    folder = os.path.join(FIXTURES, name)
    _, params = hf_models.load(folder)
    written = hf.export_hf(params, hf.read_config(folder), tmp_path / "out")
    original = hf_models.read_tensors(folder)
    exported = hf_models.read_tensors(str(tmp_path / "out"))
    assert sorted(written) == sorted(original) == sorted(exported)
    for key, tensor in original.items():  # The file itself comes back, not only the params.
        assert exported[key].dtype == tensor.dtype and exported[key].tobytes() == tensor.tobytes(), key
    back, report = load_params(f"hf:{tmp_path / 'out'}", _abstract(name)[1])
    assert report.ok
    for path, leaf in treepath.flatten(params).items():
        assert np.asarray(treepath.flatten(back)[path]).tobytes() == np.asarray(leaf).tobytes(), path
    assert json.loads((tmp_path / "out" / "config.json").read_text()) == hf.read_config(folder)


def test_export_refuses_params_of_another_model(tmp_path):
    _, params = hf_models.load(os.path.join(FIXTURES, "bert"))
    params["extra"] = {"kernel": np.zeros((2, 2), np.float32)}
    with pytest.raises(ValueError, match=r"1 tensor\(s\) no rule uses: \['extra/kernel'\]"):
        hf.export_hf(params, hf.read_config(os.path.join(FIXTURES, "bert")), tmp_path)
    assert not (tmp_path / "model.safetensors").exists()


def test_missing_folder_config_or_weights_name_what_is_missing(tmp_path):
    with pytest.raises(CheckpointNotFoundError, match="does not exist"):
        hf.open_hf(f"hf:{tmp_path / 'nope'}")
    with pytest.raises(CheckpointNotFoundError, match="has no config.json"):
        hf.open_hf(f"hf:{tmp_path}")
    shutil.copy(os.path.join(FIXTURES, "bert", "config.json"), tmp_path)
    with pytest.raises(CheckpointNotFoundError, match="no weights: expected model.safetensors"):
        hf.open_hf(f"hf:{tmp_path}")


def test_hf_source_refuses_step_and_rename():
    _, abstract = _abstract("bert")
    with pytest.raises(ValueError, match="holds one set of weights"):
        load_params("hf:" + os.path.join(FIXTURES, "bert"), abstract, step=3)
    with pytest.raises(ValueError, match="rename= does not apply"):
        load_params("hf:" + os.path.join(FIXTURES, "bert"), abstract, rename="a=>b")


def test_pytorch_bin_folder_loads_like_safetensors(tmp_path):
    torch = pytest.importorskip("torch")
    folder = os.path.join(FIXTURES, "gpt2_lm_head")
    shutil.copy(os.path.join(folder, "config.json"), tmp_path)
    torch.save({k: torch.from_numpy(v) for k, v in hf_models.read_tensors(folder).items()},
               tmp_path / "pytorch_model.bin")
    _, abstract = _abstract("gpt2_lm_head")
    params, report = load_params(f"hf:{tmp_path}", abstract)
    expected, _ = load_params("hf:" + folder, abstract)
    assert report.ok
    for path, leaf in treepath.flatten(expected).items():
        assert np.asarray(treepath.flatten(params)[path]).tobytes() == np.asarray(leaf).tobytes()


@pytest.mark.parametrize("name", ["bert", "bert_sequence_classifier", "vit_image_classifier",
                                  "gpt2_lm_head"])
def test_transformers_loads_the_export_with_the_same_outputs(name, tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    folder = os.path.join(FIXTURES, name)
    module, params = hf_models.load(folder)
    # Move the weights, so that equal outputs cannot come from the fixture itself.
    params = jax.tree.map(lambda x: x * 1.1, params)
    hf.export_hf(params, hf.read_config(folder), tmp_path)
    architecture = hf.read_config(folder).get("architectures", ["BertModel"])[0]
    model = getattr(transformers, architecture).from_pretrained(tmp_path).eval()
    inputs = dict(np.load(os.path.join(folder, "reference.npz")))
    inputs.pop("output")
    with torch.no_grad():
        outputs = model(**{k: torch.from_numpy(v) for k, v in inputs.items()})
    expected = (outputs.last_hidden_state if architecture == "BertModel" else outputs.logits).numpy()
    with jax.default_matmul_precision("highest"):
        ours = np.asarray(module.apply({"params": params}, **inputs))
    np.testing.assert_allclose(ours, expected, rtol=0, atol=1e-5)


def test_loaded_leaves_land_on_the_target_shardings():
    if len(jax.devices()) < 4:
        pytest.skip("needs 4 devices (XLA_FLAGS=--xla_force_host_platform_device_count=4)")
    from jax.sharding import Mesh, NamedSharding, PartitionSpec
    mesh = Mesh(np.array(jax.devices()[:4]), ("fsdp",))
    _, abstract = _abstract("gpt2_lm_head")

    def sharded(leaf):  # Split the last axis over 4 devices where it divides, else replicate.
        spec = PartitionSpec(*([None] * (leaf.ndim - 1)), "fsdp") if leaf.shape[-1] % 4 == 0 else PartitionSpec()
        return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=NamedSharding(mesh, spec))
    target = jax.tree.map(sharded, abstract)
    params, report = load_params("hf:" + os.path.join(FIXTURES, "gpt2_lm_head"), target)
    assert report.ok
    for path, leaf in treepath.flatten(params).items():
        assert leaf.sharding == treepath.flatten(target)[path].sharding, path
    query = params["transformer"]["h_0"]["attention"]["query"]["kernel"]  # made by the Split rule
    assert len(query.addressable_shards) == 4 and query.addressable_shards[0].data.shape == (32, 8)
