"""The UCI digits classified by a Hugging Face ViT (`ViTForImageClassification`), built from an HF
config: a tiny one by default, or the `config.json` of `checkpoint.pretrained=hf:DIR`.

The 8x8 digits are scaled to [0, 1], enlarged to the ViT's `image_size` by nearest-neighbour
sampling, repeated over its `num_channels` and given as HF's `pixel_values` (NCHW float32). The
model's HF config (with the target's labels) is the task's `hf_config` artifact, so a trained run
exports as an HF folder (`python -m jaxckpt export RUN --format hf OUT/`) that transformers loads
and that another run can start from (`checkpoint.pretrained=hf:OUT`, `checkpoint.mapping=vit:vit`
for a new head).

Config fields read:
    data.target, data.data_dir, data.val_fraction: as for `experiments.tasks.digits`.
    model.hf_config: HF config.json or folder of the model; "" = checkpoint.pretrained's when that
        is hf:, else `TINY_VIT`.
"""

from __future__ import annotations

import functools
from typing import Any, Mapping

import numpy as np

from experiments.tasks import data, digits, digits_builder, hf_models
from experiments.tasks.classifier import ClassifierTask

TINY_VIT = {
    "model_type": "vit", "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
    "intermediate_size": 64, "hidden_act": "gelu", "layer_norm_eps": 1e-12, "image_size": 16,
    "patch_size": 4, "num_channels": 3, "qkv_bias": True, "hidden_dropout_prob": 0.0,
    "attention_probs_dropout_prob": 0.0, "initializer_range": 0.02, "encoder_stride": 4,
}
"""The default ViT: 16x16 images in 4x4 patches, 2 layers of width 32 (about 30k parameters)."""


def pixel_values(image: np.ndarray, image_size: int, channels: int) -> np.ndarray:
    """An 8x8 digit (values 0..16) as a `(channels, image_size, image_size)` float32 image in [0, 1].

    Example:
        >>> pixel_values(np.eye(8) * 16, 16, 3).shape
        (3, 16, 16)
    """
    rows = np.arange(image_size) * image.shape[0] // image_size  # Nearest source row per pixel.
    cols = np.arange(image_size) * image.shape[1] // image_size
    enlarged = image.astype(np.float32)[rows][:, cols] / 16.0
    return np.ascontiguousarray(np.broadcast_to(enlarged, (channels, image_size, image_size)))


def _transform(record: Mapping[str, Any], target: str, image_size: int, channels: int) -> dict[str, np.ndarray]:
    label = record["label"] if target == "digit" else record["label"] % 2
    return {"pixel_values": pixel_values(record["image"], image_size, channels), "label": np.int32(label)}


def build(config: Any, artifacts: Mapping[str, Any] | None = None) -> ClassifierTask:
    """Builds the ViT digits task (preparing the digits dataset when batches are first needed).

    Args:
        config: an `ml_collections.ConfigDict` with the fields listed in the module docstring.
        artifacts: the run's artifacts (`{"hf_config": ...}`) to rebuild its model, or None.

    Returns:
        A `jaxckpt.Task` whose batches hold `pixel_values` (float32 `[B, C, S, S]`) and `label`,
        and whose artifacts are `{"hf_config": config.json of the model}`.

    Raises:
        ValueError: for an unknown `data.target` or a config that is not a ViT.

    Example:
        >>> task = build(get_config())  # experiments/configs/vit_digits.py
    """
    target = config.data.target
    if target not in digits.TARGETS:
        raise ValueError(f"config.data.target={target!r} is not one of {sorted(digits.TARGETS)}.")
    class_names = digits.TARGETS[target]
    hf_config = hf_models.task_config(config, artifacts, "ViTForImageClassification", class_names,
                                      default=TINY_VIT)
    if hf_config.get("model_type") != "vit":
        raise ValueError(f"The model's HF config has model_type {hf_config.get('model_type')!r}; this "
                         "task trains a ViT (model_type 'vit').")
    size, channels = int(hf_config["image_size"]), int(hf_config.get("num_channels", 3))

    def splits():
        sources = digits_builder.prepare(data.resolve_data_dir(config.data.data_dir)).as_data_source()
        train = digits._read_all(sources["train"])
        train_indices, val_indices = data.split_indices(len(train["id"]), float(config.data.val_fraction),
                                                        seed=digits._VAL_SEED)
        return {"train": digits._split(train, train_indices), "val": digits._split(train, val_indices),
                "test": digits._split(digits._read_all(sources["test"]))}

    return ClassifierTask(
        model=hf_models.build(hf_config),
        class_names=class_names,
        input_key="pixel_values",
        example_input=np.zeros((1, channels, size, size), np.float32),
        splits=splits,
        transform=functools.partial(_transform, target=target, image_size=size, channels=channels),
        artifacts={"hf_config": hf_config},
        read_options=digits._READ_OPTIONS,
    )
