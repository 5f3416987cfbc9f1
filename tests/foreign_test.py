"""Tests for jaxckpt.foreign: safetensors / PyTorch weights grafted into a Flax model."""

import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import safetensors
from safetensors.numpy import save_file

from jaxckpt import config_strings
from jaxckpt.cli.exits import USER_ERROR_EXIT_CODE, exit_code_of
from jaxckpt.errors import UserError
from jaxckpt.grafting.graft import graft
from jaxckpt.tree import treepath
from jaxckpt.weights import foreign

HIDDEN = 16


class _MLP(nn.Module):
    """A two-layer encoder, so that rename rules with group references are exercised.

    `_Model` is shaped like the digits model (encoder -> fusion -> head) but is not it: the digits
    model has one encoder layer and its head is `head/kernel`, not `head/Dense_0/kernel`. The digits
    model itself is grafted from a PyTorch MLP in tests/finetune_test.py.
    """

    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Dense(HIDDEN)(x))
        return nn.relu(nn.Dense(HIDDEN)(x))


class _Fusion(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.relu(nn.Dense(HIDDEN)(x))


class _Head(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(10)(x)


class _Model(nn.Module):
    @nn.compact
    def __call__(self, x):
        return _Head(name="head")(_Fusion(name="fusion")(_MLP(name="encoder")(x)))


# PyTorch naming and layout: Linear weight is (out, in).
_TORCH_SHAPES = {
    "encoder.layers.0.weight": (HIDDEN, 64), "encoder.layers.0.bias": (HIDDEN,),
    "encoder.layers.1.weight": (HIDDEN, HIDDEN), "encoder.layers.1.bias": (HIDDEN,),
    "fusion.proj.weight": (HIDDEN, HIDDEN), "fusion.proj.bias": (HIDDEN,),
    "head.out.weight": (10, HIDDEN), "head.out.bias": (10,),
}
def _torch_state(seed=0):
    rng = np.random.default_rng(seed)
    return {k: rng.normal(size=s).astype(np.float32) for k, s in _TORCH_SHAPES.items()}


def _torch_forward(state, x):
    """Reference forward pass of the torch-layout weights (y = x @ W.T + b)."""
    def linear(name, h):
        return h @ state[f"{name}.weight"].T + state[f"{name}.bias"]
    h = np.maximum(linear("encoder.layers.0", x), 0)
    h = np.maximum(linear("encoder.layers.1", h), 0)
    h = np.maximum(linear("fusion.proj", h), 0)
    return linear("head.out", h)


_RULES = [
    (r"encoder\.layers\.(\d+)\.weight", r"encoder/Dense_\1/kernel"),
    (r"encoder\.layers\.(\d+)\.bias", r"encoder/Dense_\1/bias"),
    (r"(fusion|head)\.(?:proj|out)\.weight", r"\1/Dense_0/kernel"),
    (r"(fusion|head)\.(?:proj|out)\.bias", r"\1/Dense_0/bias"),
]


def _fresh(seed=1):
    x = jnp.zeros((1, 64))
    return _Model().init(jax.random.key(seed), x)["params"], x


def _inputs():
    return np.random.default_rng(7).normal(size=(5, 64)).astype(np.float32)


def test_safetensors_graft_reproduces_torch_logits(tmp_path):
    state = _torch_state()
    path = tmp_path / "mlp.safetensors"
    save_file(state, str(path))
    fresh, _ = _fresh()
    params, report = foreign.graft_foreign(path, fresh, rename=_RULES)
    assert report.counts["loaded"] == 8
    assert params["encoder"]["Dense_0"]["kernel"].shape == (64, HIDDEN)
    x = _inputs()
    logits = _Model().apply({"params": params}, x)
    np.testing.assert_allclose(np.asarray(logits), _torch_forward(state, x), rtol=1e-5, atol=1e-5)


def test_string_rules_and_default_rule_agree(tmp_path):
    state = _torch_state()
    rules = ";".join(f"{p}=>{t}" for p, t in _RULES)
    save_file(state, str(tmp_path / "a.safetensors"))
    # The default rule: dots to slashes, a 2-D `weight` to `kernel` (transposed).
    flax_named = {k.replace("layers.", "Dense_").replace("proj", "Dense_0").replace("out", "Dense_0"): v
                  for k, v in state.items()}
    save_file(flax_named, str(tmp_path / "b.safetensors"))
    a = foreign.read_foreign(tmp_path / "a.safetensors", rename=config_strings.parse_rename(rules))
    b = foreign.read_foreign(tmp_path / "b.safetensors")
    assert sorted(a) == sorted(b) == sorted(treepath.flatten(_fresh()[0]))
    for key in a:
        assert a[key].shape == b[key].shape
        np.testing.assert_array_equal(np.asarray(a[key]), np.asarray(b[key]))


def test_only_grafted_tensors_are_read(tmp_path, monkeypatch):
    save_file(_torch_state(), str(tmp_path / "mlp.safetensors"))
    reads = []
    real_open = safetensors.safe_open

    class _Counting:
        def __init__(self, *args, **kwargs):
            self._f = real_open(*args, **kwargs)

        def __enter__(self):
            self._f.__enter__()
            return self

        def __exit__(self, *exc):
            return self._f.__exit__(*exc)

        def get_tensor(self, key):
            reads.append(key)
            return self._f.get_tensor(key)

        def __getattr__(self, name):
            return getattr(self._f, name)

    monkeypatch.setattr(safetensors, "safe_open", _Counting)
    flat = foreign.read_foreign(tmp_path / "mlp.safetensors", rename=_RULES)
    assert reads == [] and flat["head/Dense_0/kernel"].shape == (HIDDEN, 10)
    fresh, _ = _fresh()
    graft(flat, fresh, skip=["head"], strict=False)
    assert sorted(reads) == sorted(k for k in _TORCH_SHAPES if not k.startswith("head"))


def test_conv_weights_become_hwio(tmp_path):
    rng = np.random.default_rng(0)
    weight = rng.normal(size=(8, 3, 3, 2)).astype(np.float32)  # OIHW
    save_file({"conv.weight": weight, "conv.bias": np.zeros(8, np.float32),
               "emb.weight": weight[:, :, 0, 0].copy()}, str(tmp_path / "c.safetensors"))
    flat = foreign.read_foreign(tmp_path / "c.safetensors", rename={r"emb\.weight": "emb/embedding"})
    assert flat["conv/kernel"].shape == (3, 2, 3, 8)
    np.testing.assert_array_equal(np.asarray(flat["conv/kernel"]), weight.transpose(2, 3, 1, 0))
    np.testing.assert_array_equal(np.asarray(flat["emb/embedding"]), weight[:, :, 0, 0])
    # Same outputs as a PyTorch-semantics (NCHW, OIHW) cross-correlation.
    conv = nn.Conv(8, (3, 2), padding="VALID")
    x = rng.normal(size=(1, 6, 5, 3)).astype(np.float32)
    params = {"kernel": np.asarray(flat["conv/kernel"]), "bias": np.zeros(8, np.float32)}
    ours = conv.apply({"params": params}, x)
    torch_like = jax.lax.conv_general_dilated(
        x.transpose(0, 3, 1, 2), weight, (1, 1), "VALID", dimension_numbers=("NCHW", "OIHW", "NCHW"))
    np.testing.assert_allclose(np.asarray(ours), np.asarray(torch_like).transpose(0, 2, 3, 1), rtol=1e-5,
                               atol=1e-5)


def test_flax_layout_only_renames_and_bf16_reads(tmp_path):
    from safetensors.flax import save_file as save_jax
    save_jax({"enc.w": jnp.ones((2, 3), jnp.bfloat16), "enc.weight": jnp.ones((4, 5))},
             str(tmp_path / "f.safetensors"))
    flat = foreign.read_foreign(tmp_path / "f.safetensors", layout="flax")
    assert set(flat) == {"enc/w", "enc/weight"}
    assert flat["enc/weight"].shape == (4, 5)
    assert flat["enc/w"].dtype == ml_dtypes.bfloat16 and np.asarray(flat["enc/w"]).dtype == ml_dtypes.bfloat16


def test_only_a_pytorch_named_weight_is_transposed_even_when_square(tmp_path):
    square = np.arange(9, dtype=np.float32).reshape(3, 3)  # its shape cannot tell the layouts apart
    path = tmp_path / "sq.safetensors"
    save_file({"flax_named.kernel": square, "torch_named.weight": square, "lin.weight": square,
               "renamed.kernel": square}, str(path))
    flat = foreign.read_foreign(path, rename={r"lin\.weight": "lin/kernel", r"renamed\.kernel": "r/kernel"})
    np.testing.assert_array_equal(np.asarray(flat["flax_named/kernel"]), square)  # Flax name: Flax layout
    np.testing.assert_array_equal(np.asarray(flat["torch_named/kernel"]), square.T)
    np.testing.assert_array_equal(np.asarray(flat["lin/kernel"]), square.T)  # a rule keeps the key's layout
    np.testing.assert_array_equal(np.asarray(flat["r/kernel"]), square)
    assert flat["torch_named/kernel"].source.endswith("(transposed)")
    assert not flat["flax_named/kernel"].source.endswith("(transposed)")


def test_one_d_weight_becomes_scale(tmp_path):
    save_file({"norm.weight": np.ones(4, np.float32)}, str(tmp_path / "n.safetensors"))
    assert list(foreign.read_foreign(tmp_path / "n.safetensors")) == ["norm/scale"]


@pytest.mark.parametrize("rename, message", [
    ({r"decoder\..*": "dec/x"}, r"\[.decoder.*\] match no key"),
    ([(r"head\.(.*)", r"h/\1"), (r"head\.out\.bias", "h/b")], r"\[.head.*\] only match keys an earlier"),
    ({r"head\.out\.bias": "head//bias"}, "has an empty name"),
    ({r"encoder\.layers": "x"}, r"must match a whole key"),
    ({"enc[": "x"}, "not a valid regex"),
    ({r"encoder\.layers\.\d+\.weight": "same/kernel"}, "both become 'same/kernel'"),
])
def test_rename_errors_name_the_rule(tmp_path, rename, message):
    save_file(_torch_state(), str(tmp_path / "mlp.safetensors"))
    with pytest.raises(ValueError, match=message):
        foreign.read_foreign(tmp_path / "mlp.safetensors", rename=rename)


def test_rename_strings_are_for_configs(tmp_path):
    save_file(_torch_state(), str(tmp_path / "mlp.safetensors"))
    with pytest.raises(TypeError, match=r"jaxckpt.config_strings.parse_rename"):
        foreign.read_foreign(tmp_path / "mlp.safetensors", rename=r"encoder\.(.*)=>enc/\1")
    with pytest.raises(ValueError, match="must look like 'regex=>path'"):
        config_strings.parse_rename("encoder.layers.0.weight->kernel")


def test_unknown_suffix_missing_file_and_layout(tmp_path):
    (tmp_path / "w.npz").write_bytes(b"")
    with pytest.raises(ValueError, match="unknown weights format"):
        foreign.read_foreign(tmp_path / "w.npz")
    with pytest.raises(FileNotFoundError, match="nope.safetensors"):
        foreign.read_foreign(tmp_path / "nope.safetensors")
    with pytest.raises(ValueError, match="layout='tf'"):
        foreign.read_foreign(tmp_path / "w.npz", layout="tf")
    assert foreign.is_foreign("x/model.bin") and not foreign.is_foreign("ckpt/100")


def test_strict_graft_reports_unused_source_tensors(tmp_path):
    state = _torch_state()
    state["extra.weight"] = np.ones((3, 3), np.float32)
    save_file(state, str(tmp_path / "mlp.safetensors"))
    with pytest.raises(ValueError, match="extra/kernel"):
        foreign.graft_foreign(tmp_path / "mlp.safetensors", _fresh()[0], rename=_RULES)


def test_torch_file_without_torch_is_a_user_error_saying_how_to_install(tmp_path, monkeypatch, capsys):
    path = tmp_path / "w.pt"
    path.write_bytes(b"")
    monkeypatch.setitem(sys.modules, "torch", None)  # Makes `import torch` fail.
    with pytest.raises(UserError, match=r"needs torch, which is not installed: pip install torch\.") as excinfo:
        foreign.read_foreign(path)
    assert isinstance(excinfo.value, ImportError)  # `except ImportError` callers still catch it
    assert f"'{tmp_path / 'w.safetensors'}'" in str(excinfo.value)  # the conversion names the new file
    # Entry points (`python -m jaxckpt plan`, run.py) print it on one line and exit 2, without a traceback.
    monkeypatch.setattr(sys, "unraisablehook", sys.unraisablehook)  # exit_code_of replaces it
    assert exit_code_of(foreign.graft_foreign, path, {}) == USER_ERROR_EXIT_CODE
    err = capsys.readouterr().err
    assert err.startswith("jaxckpt: error: Reading the PyTorch file") and "Traceback" not in err


def test_safetensors_file_without_safetensors_is_a_user_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "safetensors", None)
    monkeypatch.setitem(sys.modules, "safetensors.numpy", None)
    (tmp_path / "w.safetensors").write_bytes(b"")
    with pytest.raises(UserError, match=r"pip install jaxckpt\[safetensors\]"):
        foreign.read_foreign(tmp_path / "w.safetensors")
    with pytest.raises(UserError, match=r"Writing .*pip install jaxckpt\[safetensors\]"):
        foreign.write_safetensors({"a": np.ones(2)}, tmp_path / "x.safetensors")


def test_torch_state_dict_graft_reproduces_torch_logits(tmp_path):
    torch = pytest.importorskip("torch")
    state = _torch_state()
    path = tmp_path / "mlp.pt"
    torch.save({"epoch": 3, "state_dict": {k: torch.from_numpy(v) for k, v in state.items()}}, path)
    params, report = foreign.graft_foreign(path, _fresh()[0], rename=_RULES)
    assert report.counts["loaded"] == 8
    x = _inputs()
    logits = _Model().apply({"params": params}, x)
    np.testing.assert_allclose(np.asarray(logits), _torch_forward(state, x), rtol=1e-5, atol=1e-5)


def _flax_forward_in_torch_terms(tensors, x):
    """The exported `_Model` run as PyTorch would run it: Linear(x) = x @ weight.T + bias."""
    def linear(name, h):
        return h @ tensors[f"{name}.weight"].T + tensors[f"{name}.bias"]
    h = np.maximum(linear("encoder.Dense_0", x), 0)
    h = np.maximum(linear("encoder.Dense_1", h), 0)
    h = np.maximum(linear("fusion.Dense_0", h), 0)
    return linear("head.Dense_0", h)


def test_write_safetensors_in_torch_layout_runs_as_pytorch_and_reads_back(tmp_path):
    params, _ = _fresh(seed=3)
    path = tmp_path / "export.safetensors"
    names = foreign.write_safetensors(params, path)
    assert names["encoder/Dense_0/kernel"] == "encoder.Dense_0.weight"
    assert names["head/Dense_0/bias"] == "head.Dense_0.bias"
    with safetensors.safe_open(str(path), framework="numpy") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        assert f.metadata() == {"format": "pt", foreign.LAYOUT_KEY: "torch"}
    assert tensors["encoder.Dense_0.weight"].shape == (HIDDEN, 64)  # Linear's (out, in)
    x = _inputs()
    logits = np.asarray(_Model().apply({"params": params}, x))
    np.testing.assert_allclose(_flax_forward_in_torch_terms(tensors, x), logits, rtol=1e-5, atol=1e-5)
    # The default rule maps every tensor back onto the same leaf: a strict graft loads them all.
    grafted, report = foreign.graft_foreign(path, _fresh(seed=4)[0])
    assert report.counts["loaded"] == 8 and report.ok
    for a, b in zip(jax.tree.leaves(grafted), jax.tree.leaves(params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_write_safetensors_round_trips_conv_norm_embedding_and_bf16(tmp_path):
    rng = np.random.default_rng(0)
    params = {"conv": {"kernel": rng.normal(size=(3, 2, 4, 8)).astype(np.float32)},  # HWIO
              "norm": {"scale": np.ones(8, ml_dtypes.bfloat16), "bias": np.zeros(8, np.float32)},
              "emb": {"embedding": rng.normal(size=(5, 8)).astype(np.float32)},
              "step_size": np.float32(0.5)}
    for layout in ("torch", "flax"):
        path = tmp_path / f"{layout}.safetensors"
        foreign.write_safetensors(params, path, layout=layout)
        flat = foreign.read_foreign(path)  # the layout comes from the file's header
        expected = treepath.flatten(params)
        assert set(flat) == set(expected)
        for key, value in expected.items():
            assert flat[key].dtype == np.asarray(value).dtype
            np.testing.assert_array_equal(np.asarray(flat[key]), np.asarray(value))
    with safetensors.safe_open(str(tmp_path / "torch.safetensors"), framework="numpy") as f:
        assert f.get_slice("conv.weight").get_shape() == [8, 4, 3, 2]  # OIHW
        assert "norm.weight" in f.keys() and "emb.embedding" in f.keys()
    with safetensors.safe_open(str(tmp_path / "flax.safetensors"), framework="numpy") as f:
        assert f.get_slice("conv.kernel").get_shape() == [3, 2, 4, 8]
        assert f.metadata()[foreign.LAYOUT_KEY] == "flax"


@pytest.mark.parametrize("params, layout, message", [
    ({"a": {"weight": np.ones((2, 2))}}, "torch", r"'a/weight'.*reads back as 'a/kernel'.*layout='flax'"),
    ({"a": {"weight": np.ones(3)}}, "torch", r"'a/weight' \(3,\).*reads back as 'a/scale'"),
    ({"a.b": {"bias": np.ones(3)}}, "flax", r"'a.b/bias'.*must not contain '.'"),
    ({}, "torch", "no leaf"),
    ({"a": np.ones(2)}, "tf", "layout='tf' is unknown"),
])
def test_write_safetensors_refuses_what_would_not_read_back(tmp_path, params, layout, message):
    with pytest.raises(ValueError, match=message):
        foreign.write_safetensors(params, tmp_path / "x.safetensors", layout=layout)
    assert list(tmp_path.iterdir()) == []  # nothing half-written


def test_write_safetensors_needs_the_suffix_and_replaces_atomically(tmp_path):
    with pytest.raises(ValueError, match="must end in '.safetensors'"):
        foreign.write_safetensors({"a": np.ones(2)}, tmp_path / "x.st")
    path = tmp_path / "sub" / "x.safetensors"
    foreign.write_safetensors({"a": np.ones(2, np.float32)}, path)
    foreign.write_safetensors({"b": np.zeros(3, np.float32)}, path)
    assert list(foreign.read_foreign(path)) == ["b"]
    assert [p.name for p in path.parent.iterdir()] == ["x.safetensors"]


def test_an_explicit_layout_overrides_the_header_and_a_bad_header_is_named(tmp_path):
    path = tmp_path / "f.safetensors"
    foreign.write_safetensors({"d": {"weight": np.ones((2, 3), np.float32)}}, path, layout="flax")
    assert foreign.read_foreign(path)["d/weight"].shape == (2, 3)
    assert foreign.read_foreign(path, layout="torch")["d/kernel"].shape == (3, 2)
    save_file({"d.kernel": np.ones((2, 3), np.float32)}, str(path), metadata={foreign.LAYOUT_KEY: "jax"})
    with pytest.raises(ValueError, match="jaxckpt_layout='jax'"):
        foreign.read_foreign(path)


def test_exported_torch_layout_survives_a_pytorch_state_dict(tmp_path):
    torch = pytest.importorskip("torch")
    params, _ = _fresh(seed=5)
    foreign.write_safetensors(params, tmp_path / "m.safetensors")
    with safetensors.safe_open(str(tmp_path / "m.safetensors"), framework="numpy") as f:
        torch.save({k: torch.from_numpy(f.get_tensor(k).copy()) for k in f.keys()}, tmp_path / "m.pt")
    grafted, report = foreign.graft_foreign(tmp_path / "m.pt", _fresh(seed=6)[0])
    assert report.ok and report.counts["loaded"] == 8
    for a, b in zip(jax.tree.leaves(grafted), jax.tree.leaves(params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
