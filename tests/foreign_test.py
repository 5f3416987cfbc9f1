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

from jaxckpt import foreign, treepath
from jaxckpt.graft import graft

HIDDEN = 16


class _MLP(nn.Module):
    """The digits model's parameter structure: encoder/Dense_{0,1}, fusion/Dense_0, head/Dense_0."""

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
    a = foreign.read_foreign(tmp_path / "a.safetensors", rename=rules)
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


def test_one_d_weight_becomes_scale(tmp_path):
    save_file({"norm.weight": np.ones(4, np.float32)}, str(tmp_path / "n.safetensors"))
    assert list(foreign.read_foreign(tmp_path / "n.safetensors")) == ["norm/scale"]


@pytest.mark.parametrize("rename, message", [
    ({r"decoder\..*": "dec/x"}, r"\[.decoder.*\] match no key"),
    ([(r"head\.(.*)", r"h/\1"), (r"head\.out\.bias", "h/b")], r"\[.head.*\] only match keys an earlier"),
    ({r"head\.out\.bias": "head//bias"}, "has an empty name"),
    ({r"encoder\.layers": "x"}, r"must match a whole key"),
    ("encoder.layers.0.weight->kernel", "must look like 'regex=>path'"),
    ({"enc[": "x"}, "not a valid regex"),
    ({r"encoder\.layers\.\d+\.weight": "same/kernel"}, "both become 'same/kernel'"),
])
def test_rename_errors_name_the_rule(tmp_path, rename, message):
    save_file(_torch_state(), str(tmp_path / "mlp.safetensors"))
    with pytest.raises(ValueError, match=message):
        foreign.read_foreign(tmp_path / "mlp.safetensors", rename=rename)


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


def test_torch_file_without_torch_says_how_to_install(tmp_path, monkeypatch):
    (tmp_path / "w.pt").write_bytes(b"")
    monkeypatch.setitem(sys.modules, "torch", None)  # Makes `import torch` fail.
    with pytest.raises(ImportError, match=r"pip install jaxckpt\[torch\]"):
        foreign.read_foreign(tmp_path / "w.pt")


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
