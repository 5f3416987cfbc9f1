"""End-to-end finetuning through `jaxckpt.run`: freezing, learning-rate multipliers, shape adapters and
foreign (safetensors / PyTorch) weights exported from a run and loaded back."""

import json
import math

import jax
import numpy as np
import pytest
from safetensors.numpy import save_file

import jaxckpt
from experiments.configs import digits
from jaxckpt.checkpoint.stepdir import read_state_metadata
from jaxckpt.cli import commands as cli
from jaxckpt.errors import UserError
from jaxckpt.runner.sources import load_pretrained
from jaxckpt.runner.task import load_task
from jaxckpt.tree import treepath
from jaxckpt.weights import foreign
from tests.runs import ROOT, override, tiny_config

# Adam keeps two moments (mu, nu) per trainable float32 value.
_ADAM_MOMENTS = 2


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory, data_dir):
    """A finished 20-step digits run that the tests finetune from (never write to)."""
    workdir = tmp_path_factory.mktemp("pretrained")
    jaxckpt.run(tiny_config(data_dir, **{"train.num_steps": 20}), workdir)
    return workdir


def _latest(workdir):
    checkpoints = workdir / "checkpoints"
    return checkpoints / str(max(int(p.name) for p in checkpoints.iterdir() if p.name.isdigit()))


def _params(workdir):
    """The latest step's params, read strictly onto the shapes saved in it."""
    saved = read_state_metadata(_latest(workdir))
    abstract = treepath.unflatten_dict(
        {p[len("params/"):]: v for p, v in saved.items() if p.startswith("params/")})
    return treepath.flatten(jaxckpt.load_params(_latest(workdir), abstract)[0])


def _opt_state_bytes(workdir):
    """Bytes of the saved optimizer state, from the checkpoint's metadata (no array is read)."""
    saved = read_state_metadata(_latest(workdir))
    return sum(math.prod(v.shape) * v.dtype.itemsize for p, v in saved.items() if p.startswith("opt_state/"))


def _fresh_params(config):
    return load_task(config).init_params(jax.random.fold_in(jax.random.PRNGKey(config.seed), 1))


def test_frozen_encoder_stays_pretrained_bitwise_and_keeps_no_moments(tmp_path, data_dir, pretrained, capsys):
    workdir = tmp_path / "frozen"
    config = tiny_config(data_dir, **{"checkpoint.pretrained": str(pretrained), "optimizer.freeze": "encoder",
                                      "train.num_steps": 20})
    jaxckpt.run(config, workdir)
    before, after = _params(pretrained), _params(workdir)
    for path in before:
        if path.startswith("encoder/"):
            np.testing.assert_array_equal(after[path], before[path])
        else:
            assert not np.array_equal(after[path], before[path]), f"{path} did not train"
    encoder_bytes = sum(v.nbytes for p, v in before.items() if p.startswith("encoder/"))
    saved = read_state_metadata(_latest(workdir))
    assert not [p for p in saved if p.startswith("opt_state/") and "/encoder/" in p]
    # The pretrained run trained everything with the same optimizer: the difference is the encoder's moments.
    assert _opt_state_bytes(pretrained) - _opt_state_bytes(workdir) == _ADAM_MOMENTS * encoder_bytes
    assert cli.main(["inspect", str(workdir)]) == 0
    out = capsys.readouterr().out
    assert "optimizer.freeze = 'encoder'" in out
    assert {line.split()[0]: line.split()[-1] for line in out.splitlines() if line.startswith("params/")} == {
        "params/encoder/Dense_0/bias": "frozen", "params/encoder/Dense_0/kernel": "frozen",
        "params/fusion/Dense_0/bias": "train", "params/fusion/Dense_0/kernel": "train",
        "params/head/bias": "train", "params/head/kernel": "train"}


def test_lr_multiplier_scales_only_the_head_step(tmp_path, data_dir, pretrained):
    """One sgd step from the same weights, batch and dropout: the head moves 10 times as far, the rest the same."""
    common = {"checkpoint.pretrained": str(pretrained), "optimizer.name": "sgd", "optimizer.learning_rate": 0.05,
              "train.num_steps": 1, "run_type": "train"}
    base = jaxckpt.run(tiny_config(data_dir, **common), tmp_path / "base").params
    fast = jaxckpt.run(tiny_config(data_dir, **common, **{"optimizer.lr_multipliers": "head:10"}),
                       tmp_path / "fast").params
    start = _params(pretrained)
    base, fast = treepath.flatten(base), treepath.flatten(fast)
    for path in start:
        if path.startswith("head/"):
            step = np.asarray(base[path]) - start[path]
            assert np.abs(step).max() > 0
            # Steps are read back as differences of float32 params: exact up to an ulp of the param (~1e-7).
            np.testing.assert_allclose(np.asarray(fast[path]) - start[path], 10 * step, rtol=1e-4, atol=2e-6)
        else:
            np.testing.assert_array_equal(np.asarray(fast[path]), np.asarray(base[path]))


@pytest.mark.parametrize("override, message", [
    ({"optimizer.freeze": "decoder"}, r"\['decoder'\] match no parameter path"),
    ({"optimizer.lr_multipliers": "head:10,backbone:0.1"}, r"\['backbone'\] match no parameter path"),
    # A pattern names a whole path or subtree: "enc" is not a prefix match for "encoder".
    ({"optimizer.freeze": "enc"}, r"\['enc'\] match no parameter path"),
])
def test_a_pattern_that_matches_nothing_fails_before_training(tmp_path, data_dir, override, message):
    with pytest.raises(ValueError, match=message) as excinfo:
        jaxckpt.run(tiny_config(data_dir, **override), tmp_path / "run")
    assert "encoder/Dense_0/kernel" in str(excinfo.value)  # the paths there are, to pick from
    checkpoints = tmp_path / "run" / "checkpoints"
    assert not checkpoints.exists() or not list(checkpoints.iterdir())


def test_resize_adapter_grows_a_parity_head_to_ten_digits(tmp_path, data_dir):
    parity = tmp_path / "parity"
    jaxckpt.run(tiny_config(data_dir, **{"data.target": "parity", "train.num_steps": 10, "run_type": "train"}),
                parity)
    source = _params(parity)
    assert source["head/kernel"].shape == (16, 2)
    finetune = {"checkpoint.pretrained": str(parity), "train.num_steps": 1, "run_type": "train"}
    with pytest.raises(UserError, match=r"head/kernel.*\(16, 2\) vs target \(16, 10\)"):
        jaxckpt.run(tiny_config(data_dir, **finetune), tmp_path / "strict")
    workdir = tmp_path / "digit"
    # The head is frozen only so that its values after the run are the grafted ones.
    config = tiny_config(data_dir, **finetune, **{"checkpoint.adapters": "head:resize",
                                                  "optimizer.freeze": "head"})
    state = jaxckpt.run(config, workdir)
    report = json.loads((workdir / "graft_report.json").read_text())
    assert report["ok"] and report["counts"]["loaded"] == 4
    adapted = {(e["path"], tuple(e["source_shape"]), tuple(e["target_shape"]), e["rule"])
               for e in report["adapted"]}
    assert adapted == {("head/kernel", (16, 2), (16, 10), "resize"), ("head/bias", (2,), (10,), "resize")}
    head = treepath.flatten(state.params)
    fresh = treepath.flatten(_fresh_params(config))
    np.testing.assert_array_equal(np.asarray(head["head/kernel"])[:, :2], source["head/kernel"])
    np.testing.assert_array_equal(np.asarray(head["head/bias"])[:2], source["head/bias"])
    np.testing.assert_array_equal(np.asarray(head["head/kernel"])[:, 2:],
                                  np.asarray(fresh["head/kernel"])[:, 2:])  # the new classes start fresh


@pytest.fixture(scope="module")
def exported(tmp_path_factory, pretrained):
    """The pretrained run's params, exported with the CLI in PyTorch names and layout."""
    path = tmp_path_factory.mktemp("export") / "digits.safetensors"
    assert cli.main(["export", str(pretrained), str(path)]) == 0
    return path


def _assert_same_model(config, params, pretrained):
    """Every leaf equals the pretrained run's, and so do the logits on a validation batch."""
    original = _params(pretrained)
    flat = treepath.flatten(params)
    assert set(flat) == set(original)
    for path, value in original.items():
        np.testing.assert_array_equal(np.asarray(flat[path]), value)
    task = load_task(config)
    batch = next(iter(task.eval_batches("val", 64)))
    ours = task.predict_fn(params, batch)
    theirs = task.predict_fn(treepath.unflatten_dict(original), batch)
    np.testing.assert_array_equal(np.asarray(ours), np.asarray(theirs))


def test_exported_safetensors_loads_strictly_into_the_same_model(tmp_path, data_dir, pretrained, exported, capsys):
    import safetensors

    with safetensors.safe_open(str(exported), framework="numpy") as f:
        assert f.get_slice("encoder.Dense_0.weight").get_shape() == [32, 64]  # PyTorch's (out, in)
        assert sorted(f.keys()) == ["encoder.Dense_0.bias", "encoder.Dense_0.weight", "fusion.Dense_0.bias",
                                    "fusion.Dense_0.weight", "head.bias", "head.weight"]
    config = tiny_config(data_dir, **{"checkpoint.pretrained": str(exported)})
    params, report = load_pretrained(str(exported), _fresh_params(config), config.checkpoint)
    assert report.ok and report.counts["loaded"] == 6
    _assert_same_model(config, params, pretrained)
    # The loop takes the file as checkpoint.pretrained, strictly, with the default rename rules.
    jaxckpt.run(tiny_config(data_dir, **{"checkpoint.pretrained": str(exported), "train.num_steps": 1,
                                         "run_type": "train"}), tmp_path / "run")
    assert json.loads((tmp_path / "run" / "graft_report.json").read_text())["counts"]["loaded"] == 6
    plan = ["plan", str(exported), "--config", str(ROOT / "experiments" / "configs" / "digits.py"),
            f"--config.data.data_dir={data_dir}", "--config.model.encoder_dims=(32,)",
            "--config.model.fusion_dims=(16,)"]
    assert cli.main(plan) == 0
    out = capsys.readouterr().out
    assert f"weights file {exported}" in out and "loaded 6" in out and "would succeed" in out


def test_exported_weights_load_from_a_pytorch_state_dict(tmp_path, data_dir, pretrained, exported):
    torch = pytest.importorskip("torch")
    path = tmp_path / "digits.pt"
    # The exported tensors under their file names, as a PyTorch model's state_dict() would hold them.
    tensors = foreign.read_foreign(exported, layout="flax")
    torch.save({name.replace("/", "."): torch.from_numpy(np.array(v)) for name, v in tensors.items()}, path)
    config = tiny_config(data_dir, **{"checkpoint.pretrained": str(path)})
    params, report = load_pretrained(str(path), _fresh_params(config), config.checkpoint)
    assert report.ok
    _assert_same_model(config, params, pretrained)


# The digits model's default shapes (experiments/configs/digits.py: encoder_dims=(128,), fusion_dims=(64,),
# 64 pixels in, 10 digits out) as a PyTorch nn.Sequential(Linear, ReLU, Linear, ReLU, Linear) names them.
_SEQUENTIAL_SHAPES = {"0.weight": (128, 64), "0.bias": (128,), "2.weight": (64, 128), "2.bias": (64,),
                      "4.weight": (10, 64), "4.bias": (10,)}
# checkpoint.rename rules from the Sequential's indices to the Flax model's paths.
_SEQUENTIAL_RENAME = (r"0\.weight=>encoder/Dense_0/kernel;0\.bias=>encoder/Dense_0/bias;"
                      r"2\.weight=>fusion/Dense_0/kernel;2\.bias=>fusion/Dense_0/bias;"
                      r"4\.weight=>head/kernel;4\.bias=>head/bias")


def _graft_into_digits_model(path, data_dir):
    """Grafts `path` into the default digits model as `checkpoint.pretrained` does, strictly."""
    config = override(digits.get_config(), **{"data.data_dir": str(data_dir), "checkpoint.pretrained": str(path),
                                              "checkpoint.rename": _SEQUENTIAL_RENAME})
    assert config.checkpoint.strict
    task = load_task(config)
    params, report = load_pretrained(str(path), _fresh_params(config), config.checkpoint)
    assert report.ok and report.counts["loaded"] == 6, report
    return lambda images: np.asarray(task.model.apply({"params": params}, images, deterministic=True))


def _random_images(n=32):
    return np.random.default_rng(0).uniform(0, 16, size=(n, 8, 8)).astype(np.float32)  # pixels are 0..16


def test_pytorch_mlp_saved_as_safetensors_gives_the_digits_model_its_logits(tmp_path, data_dir):
    """Needs no torch: the tensors are built in PyTorch's names and (out, in) layout with numpy."""
    rng = np.random.default_rng(1)
    state = {k: rng.uniform(-0.1, 0.1, size=s).astype(np.float32) for k, s in _SEQUENTIAL_SHAPES.items()}
    path = tmp_path / "mlp.safetensors"
    save_file(state, str(path))
    images = _random_images()

    def linear(i, h):  # torch.nn.Linear: x @ weight.T + bias
        return h @ state[f"{i}.weight"].T + state[f"{i}.bias"]
    reference = linear(4, np.maximum(linear(2, np.maximum(linear(0, images.reshape(len(images), 64)), 0)), 0))
    logits = _graft_into_digits_model(path, data_dir)(images)
    assert logits.shape == (32, 10)
    np.testing.assert_allclose(logits, reference, rtol=1e-5, atol=1e-5)


def test_pytorch_mlp_state_dict_as_pt_and_safetensors_gives_the_digits_model_its_logits(tmp_path, data_dir):
    torch = pytest.importorskip("torch")
    from safetensors.torch import save_file as save_torch_file

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 64), torch.nn.ReLU(),
                              torch.nn.Linear(64, 10)).eval()
    assert {k: tuple(v.shape) for k, v in net.state_dict().items()} == _SEQUENTIAL_SHAPES
    torch.save(net.state_dict(), tmp_path / "mlp.pt")
    save_torch_file(net.state_dict(), str(tmp_path / "mlp.safetensors"))
    images = _random_images()
    with torch.no_grad():
        reference = net(torch.from_numpy(images.reshape(len(images), 64))).numpy()
    for name in ("mlp.pt", "mlp.safetensors"):
        logits = _graft_into_digits_model(tmp_path / name, data_dir)(images)
        np.testing.assert_allclose(logits, reference, rtol=1e-5, atol=1e-5, err_msg=name)
