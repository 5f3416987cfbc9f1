"""Hugging Face BERT, ViT and GPT-2 checkpoints as Flax models whose outputs equal PyTorch's.

`load(path)` reads a folder that HF's `save_pretrained` wrote and returns `(module, params)`:
`module.apply({"params": params}, **inputs)` takes HF's input names and layouts (`input_ids`,
`attention_mask`, `token_type_ids`; `pixel_values` NCHW float32) and returns the main output
(`last_hidden_state` for `BertModel`, `logits` for the others). `build(config)` makes the module
alone, for a fresh init. The modules are in `experiments.tasks.hf_modules`; the HF -> Flax renames
and layouts are the tables of `jaxckpt.weights.hf_presets`, applied by `jaxckpt.load_params("hf:...")`.

Example:
    >>> module, params = load("hf:tests/fixtures/hf/bert")
    >>> module.apply({"params": params}, input_ids=np.array([[5, 6, 7]])).shape
    (1, 3, 32)
"""

from __future__ import annotations

import json
import os
from typing import Any, Callable, Mapping, Sequence

import flax.linen as nn
import jax
import numpy as np

from experiments.tasks.hf_modules import (
    ACTIVATIONS,
    BertForSequenceClassification,
    BertModel,
    GPT2LMHeadModel,
    TransformerConfig,
    ViTForImageClassification,
)
from jaxckpt.types import Params
from jaxckpt.weights import hf, hf_presets
from jaxckpt.weights.pretrained import load_params


def _require(config: Mapping, key: str, supported: Any) -> None:
    """Raises if `config[key]` is set to something the Flax models do not implement."""
    if key in config and config[key] != supported:
        raise ValueError(f"config.json sets {key}={config[key]!r}; the Flax port supports only "
                         f"{supported!r}.")


def _num_labels(config: Mapping) -> int:
    # config.json records the labels (`id2label`), not `num_labels`; HF's default is 2.
    return len(config["id2label"]) if config.get("id2label") else config.get("num_labels", 2)


def _bert_config(config: Mapping) -> TransformerConfig:
    _require(config, "position_embedding_type", "absolute")
    _require(config, "is_decoder", False)
    _require(config, "add_cross_attention", False)
    classifier_dropout = config.get("classifier_dropout")
    return TransformerConfig(
        hidden_size=config["hidden_size"], num_layers=config["num_hidden_layers"],
        num_heads=config["num_attention_heads"], intermediate_size=config["intermediate_size"],
        activation=config.get("hidden_act", "gelu"), layer_norm_eps=config.get("layer_norm_eps", 1e-12),
        hidden_dropout=config.get("hidden_dropout_prob", 0.1),
        attention_dropout=config.get("attention_probs_dropout_prob", 0.1),
        embedding_dropout=config.get("hidden_dropout_prob", 0.1),
        classifier_dropout=(config.get("hidden_dropout_prob", 0.1) if classifier_dropout is None
                            else classifier_dropout),
        initializer_range=config.get("initializer_range", 0.02),
        vocab_size=config["vocab_size"], max_positions=config["max_position_embeddings"],
        type_vocab_size=config.get("type_vocab_size", 2), num_labels=_num_labels(config))


def _vit_config(config: Mapping) -> TransformerConfig:
    _require(config, "qkv_bias", True)
    return TransformerConfig(
        hidden_size=config["hidden_size"], num_layers=config["num_hidden_layers"],
        num_heads=config["num_attention_heads"], intermediate_size=config["intermediate_size"],
        activation=config.get("hidden_act", "gelu"), layer_norm_eps=config.get("layer_norm_eps", 1e-12),
        hidden_dropout=config.get("hidden_dropout_prob", 0.0),
        attention_dropout=config.get("attention_probs_dropout_prob", 0.0),
        embedding_dropout=config.get("hidden_dropout_prob", 0.0),
        initializer_range=config.get("initializer_range", 0.02), num_labels=_num_labels(config),
        image_size=config["image_size"], patch_size=config["patch_size"],
        num_channels=config.get("num_channels", 3))


def _gpt2_config(config: Mapping) -> TransformerConfig:
    _require(config, "scale_attn_weights", True)
    _require(config, "scale_attn_by_inverse_layer_idx", False)
    _require(config, "reorder_and_upcast_attn", False)
    _require(config, "add_cross_attention", False)
    hidden = config["n_embd"]
    return TransformerConfig(
        hidden_size=hidden, num_layers=config["n_layer"], num_heads=config["n_head"],
        intermediate_size=config.get("n_inner") or 4 * hidden,
        activation=config.get("activation_function", "gelu_new"),
        layer_norm_eps=config.get("layer_norm_epsilon", 1e-5),
        hidden_dropout=config.get("resid_pdrop", 0.1), attention_dropout=config.get("attn_pdrop", 0.1),
        embedding_dropout=config.get("embd_pdrop", 0.1),
        initializer_range=config.get("initializer_range", 0.02),
        vocab_size=config["vocab_size"], max_positions=config["n_positions"])


# family -> (module class, config reader); families are the keys of `hf_presets.PRESETS`.
_MODELS: dict[str, tuple[type[nn.Module], Callable[[Mapping], TransformerConfig]]] = {
    "bert": (BertModel, _bert_config),
    "bert_sequence_classifier": (BertForSequenceClassification, _bert_config),
    "vit_image_classifier": (ViTForImageClassification, _vit_config),
    "gpt2_lm_head": (GPT2LMHeadModel, _gpt2_config),
}


def build(config: Mapping) -> nn.Module:
    """The Flax model of an HF `config.json`, for a fresh init or to apply loaded params.

    Args:
        config: the parsed `config.json` (its `architectures` choose the model).

    Returns:
        The module; `module.init(rng, **example_inputs(module))["params"]` initialises it.

    Raises:
        ValueError: for an architecture without a Flax port, or a config option it does not implement.

    Example:
        >>> module = build({"architectures": ["GPT2LMHeadModel"], "n_embd": 8, "n_layer": 1,
        ...                 "n_head": 2, "vocab_size": 10, "n_positions": 4})
        >>> params = module.init(jax.random.key(0), **example_inputs(module))["params"]
        >>> params["transformer"]["h_0"]["attention"]["query"]["kernel"].shape
        (8, 8)
    """
    module_class, read_config = _MODELS[hf_presets.family_of(config)]
    model_config = read_config(config)
    if model_config.activation not in ACTIVATIONS:
        raise ValueError(f"config.json asks for activation {model_config.activation!r}; the Flax "
                         f"port has {sorted(ACTIVATIONS)}.")
    return module_class(model_config)


def example_inputs(module: nn.Module) -> dict[str, np.ndarray]:
    """Inputs of the right kinds and shapes for `module.init` (one example, all zeros)."""
    cfg = module.config
    if isinstance(module, ViTForImageClassification):
        return {"pixel_values": np.zeros((1, cfg.num_channels, cfg.image_size, cfg.image_size),
                                         np.float32)}
    return {"input_ids": np.zeros((1, 1), np.int32)}


def read_tensors(folder: str) -> dict[str, np.ndarray]:
    """The tensors of `model.safetensors`, or of every shard `model.safetensors.index.json` names."""
    from safetensors.numpy import (
        load_file,  # An optional dependency (extra `safetensors`).
    )

    single = os.path.join(folder, "model.safetensors")
    index = os.path.join(folder, "model.safetensors.index.json")
    if os.path.exists(single):
        return load_file(single)
    if not os.path.exists(index):
        raise FileNotFoundError(f"{folder!r} has neither model.safetensors nor "
                                "model.safetensors.index.json; save the model with "
                                "save_pretrained(folder) (safetensors, the default).")
    with open(index) as f:
        weight_map = json.load(f)["weight_map"]
    tensors: dict[str, np.ndarray] = {}
    for shard in sorted(set(weight_map.values())):
        tensors.update(load_file(os.path.join(folder, shard)))
    if missing := sorted(set(weight_map) - set(tensors)):
        raise ValueError(f"{index} names tensors that its shards lack: {missing}.")
    return tensors


def load(path: str) -> tuple[nn.Module, Params]:
    """The Flax model and params of an HF folder written by `save_pretrained`.

    The one conversion path: `jaxckpt.load_params("hf:...")` grafts the folder strictly onto the
    module's abstract init, reading each tensor once.

    Args:
        path: the folder (holding `config.json` and safetensors weights), optionally `hf:`-prefixed.

    Returns:
        `(module, params)`; `module.apply({"params": params}, **inputs)` gives the main output.

    Raises:
        FileNotFoundError: if the folder lacks `config.json` or weights.
        ValueError: if the weights do not convert exactly, or do not fit the model (the graft's
            strict error, naming every leaf).

    Example:
        >>> module, params = load("hf:tests/fixtures/hf/gpt2_lm_head")
        >>> module.apply({"params": params}, input_ids=np.array([[1, 2, 3]])).shape
        (1, 3, 100)
    """
    folder = str(hf.folder_of(path))
    module = build(hf.read_config(folder))
    abstract = jax.eval_shape(lambda: module.init(jax.random.key(0), **example_inputs(module)))
    params, _ = load_params(hf.PREFIX + folder, abstract["params"])
    return module, params


def task_config(config: Any, artifacts: Mapping[str, Any] | None, architecture: str,
                class_names: Sequence[str], default: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The HF `config.json` of a task's model, with the task's architecture and labels.

    Taken, in order, from the run's saved `hf_config` artifact (a resumed or evaluated run is
    rebuilt as it was); from `config.model.hf_config` (a `config.json`, or an HF folder with or
    without `hf:`); from `config.checkpoint.pretrained` when it is an `hf:` folder; else `default`.
    Its `architectures` and labels (`id2label`, `label2id`) are then set to the task's, so a
    base-model folder (`BertModel`) gives a classifier with a fresh head of `len(class_names)`.

    Args:
        config: the experiment config (reads `model.hf_config`, `checkpoint.pretrained`).
        artifacts: the run's task artifacts, or None for a fresh run.
        architecture: the HF class name of the task's model, e.g. `"BertForSequenceClassification"`.
        class_names: the labels, in logit order.
        default: the config to use when nothing above names one.

    Returns:
        The config, JSON-able: the task keeps it as its `hf_config` artifact, which `python -m
        jaxckpt export RUN --format hf OUT/` writes as `OUT/config.json`.

    Raises:
        ValueError: if nothing names a config and there is no default.
        FileNotFoundError: if the named config does not exist.
    """
    if artifacts and "hf_config" in artifacts:
        return dict(artifacts["hf_config"])
    pretrained = str(config.checkpoint.pretrained or "")
    source = str(config.model.hf_config or "") or (pretrained if hf.is_hf(pretrained) else "")
    if source.endswith(".json"):
        with open(source) as f:
            base = json.load(f)
    elif source:
        base = hf.read_config(source)
    elif default is not None:
        base = dict(default)
    else:
        raise ValueError("No HF config for the model: set --config.model.hf_config=PATH (a "
                         "config.json or an HF folder) or --config.checkpoint.pretrained=hf:DIR.")
    base["architectures"] = [architecture]
    base["id2label"] = {str(i): name for i, name in enumerate(class_names)}
    base["label2id"] = {name: i for i, name in enumerate(class_names)}
    return base
