"""Hugging Face model folders in and out: `hf:DIR` as a weights source, and `export_hf`.

A folder as `save_pretrained` writes it holds `config.json` and the weights: `model.safetensors`,
or shards named by `model.safetensors.index.json`, or (read with torch) `pytorch_model.bin` or its
shards named by `pytorch_model.bin.index.json`. `config.json` names the model family
(`hf_presets.family_of`), whose table renames every tensor and gives its layout. `open_hf` reads only
the file headers: each tensor becomes a `tensor_files.LazyTensor` at its Flax path (transposed on read
where the table says so), and fused tensors (GPT-2's `c_attn`) stay under their HF key for the
table's `Split` rules, which the graft applies. So `load_params("hf:DIR", target)` reads each tensor
it loads once, by byte range, and nothing else.

`export_hf(params, config, out_dir)` goes the other way with the same table: `config.json` plus one
`model.safetensors` that `transformers`' `from_pretrained` loads; reading it back with
`load_params("hf:OUT")` gives the same params bit for bit.
"""

from __future__ import annotations

import json
import os
import pathlib
from typing import Any, Mapping, NamedTuple

import numpy as np

from jaxckpt.errors import CheckpointNotFoundError, MissingDependencyError
from jaxckpt.grafting.structure import Split
from jaxckpt.tree import treepath
from jaxckpt.types import Params
from jaxckpt.weights import hf_presets
from jaxckpt.weights.tensor_files import LazyTensor, open_safetensors, open_torch, refuse_url

PREFIX = "hf:"
CONFIG_FILE = "config.json"
# (weights file, its shard index), in the order they are looked for; .bin files need torch.
_WEIGHTS = (("model.safetensors", "model.safetensors.index.json"),
            ("pytorch_model.bin", "pytorch_model.bin.index.json"))


class HFSource(NamedTuple):
    """An HF folder opened for grafting (nothing read but headers and `config.json`).

    Attributes:
        folder: the folder.
        config: its parsed `config.json`.
        family: the `hf_presets.PRESETS` key its config names.
        leaves: flat `{path: LazyTensor}`: Flax paths, and HF keys for the fused tensors.
        structure: the `Split` rules that cut the fused tensors, for `graft(structure=...)`.
        files: the weights files it reads.
    """

    folder: pathlib.Path
    config: dict[str, Any]
    family: str
    leaves: dict[str, LazyTensor]
    structure: tuple[Split, ...]
    files: tuple[str, ...]


def is_hf(path: Any) -> bool:
    """Whether `path` is an `hf:DIR` reference.

    Example:
        >>> is_hf("hf:models/bert"), is_hf("runs/bert")
        (True, False)
    """
    return isinstance(path, str) and path.startswith(PREFIX)


def folder_of(path: str | os.PathLike) -> pathlib.Path:
    """The folder of `hf:DIR` (or of a plain `DIR`).

    Raises:
        UserError: if DIR is a URL: HF folders are read from a local disk (safetensors maps them).
    """
    refuse_url(path, "HF folders (hf:DIR) are read from a local disk")
    return pathlib.Path(os.fspath(path).removeprefix(PREFIX)).expanduser()


def read_config(path: str | os.PathLike) -> dict[str, Any]:
    """The parsed `config.json` of an HF folder (`hf:DIR` or `DIR`).

    Raises:
        CheckpointNotFoundError: if the folder or its `config.json` does not exist.
    """
    folder = folder_of(path)
    config_path = folder / CONFIG_FILE
    if not config_path.is_file():
        what = "does not exist" if not folder.exists() else f"has no {CONFIG_FILE}"
        raise CheckpointNotFoundError(
            f"hf:{folder} {what}; hf:DIR takes a folder as save_pretrained writes it "
            f"({CONFIG_FILE} and model.safetensors, or sharded safetensors with an index).")
    with open(config_path) as f:
        return json.load(f)


def _weight_files(folder: pathlib.Path) -> tuple[str, ...]:
    for single, index in _WEIGHTS:
        if (folder / single).is_file():
            return (single,)
        if (folder / index).is_file():
            with open(folder / index) as f:
                weight_map = json.load(f)["weight_map"]
            files = tuple(sorted(set(weight_map.values())))
            if missing := [name for name in files if not (folder / name).is_file()]:
                raise CheckpointNotFoundError(f"{folder / index} names shards that are not there: "
                                              f"{missing}.")
            return files
    raise CheckpointNotFoundError(
        f"hf:{folder} has {CONFIG_FILE} but no weights: expected model.safetensors, "
        "model.safetensors.index.json with its shards, or pytorch_model.bin (needs torch).")


def open_hf(path: str | os.PathLike) -> HFSource:
    """Opens an HF folder as a lazy, Flax-named source; reads headers only.

    Args:
        path: `hf:DIR` or `DIR`.

    Returns:
        The `HFSource`; `graft(source.leaves, target, structure=source.structure)` loads it.

    Raises:
        CheckpointNotFoundError: for a missing folder, `config.json` or weights file.
        ValueError: if the config names a model without a preset, or a tensor fits no rule of it.
        MissingDependencyError: for `.bin` weights without torch (or safetensors without
            safetensors).

    Example:
        >>> source = open_hf("hf:tests/fixtures/hf/gpt2_lm_head")
        >>> source.family, source.leaves["transformer/wte/embedding"].shape
        ('gpt2_lm_head', (100, 32))
    """
    folder = folder_of(path)
    config = read_config(folder)
    family = hf_presets.family_of(config)
    files = _weight_files(folder)
    entries: dict[str, tuple[Any, tuple[int, ...], Any, str]] = {}
    for name in files:
        file = str(folder / name)
        opened = open_safetensors(file)[0] if name.endswith(".safetensors") else open_torch(file)
        for key, (read, shape, dtype) in opened.items():
            if key in entries:
                raise ValueError(f"hf:{folder}: tensor {key!r} is in both {entries[key][3]} and {name}.")
            entries[key] = (read, shape, dtype, name)
    plan = hf_presets.match(family, list(entries))
    leaves = {}
    for key, (flax_path, perm) in plan.paths.items():
        read, shape, dtype, name = entries[key]
        if perm is not None and len(shape) != len(perm):
            raise ValueError(f"hf:{folder}: {name}:{key} has shape {shape}, but the {family!r} "
                             f"table needs {len(perm)} axes for it; the file is not of this family.")
        leaves[flax_path] = LazyTensor(read, shape, dtype, f"{name}:{key}", perm)
    return HFSource(folder, config, family, leaves, plan.structure, files)


def export_hf(params: Params, config: Mapping[str, Any],
              out_dir: str | os.PathLike) -> dict[str, tuple[int, ...]]:
    """Writes params as an HF folder: `config.json` and `model.safetensors` (PyTorch names, layouts).

    The family's table (from `config`) names and lays out every tensor; `transformers`'
    `from_pretrained(out_dir)` loads it, and `load_params("hf:" + out_dir, ...)` reads the same
    params back bit for bit. Tied weights (GPT-2's LM head) are not written, as HF does not write
    them. Files are written under temporary names and renamed, so an interrupted export leaves no
    truncated file.

    Args:
        params: the model's params (nested dicts; jax arrays are copied to the host).
        config: the model's HF `config.json`, parsed; written as it is.
        out_dir: the folder to write (created if needed; its two files are replaced).

    Returns:
        `{hf_key: shape}` of every tensor written.

    Raises:
        ValueError: if the config names no preset, or the params do not fit its table (the
            message names every leaf no rule takes and every rule that matched nothing).
        MissingDependencyError: if safetensors is not installed.

    Example:
        >>> module, params = hf_models.load("hf:tests/fixtures/hf/bert")   # experiments/
        >>> export_hf(params, read_config("hf:tests/fixtures/hf/bert"), "/tmp/bert_out")
    """
    try:
        from safetensors.numpy import save_file
    except ImportError:
        raise MissingDependencyError("export_hf needs the safetensors package: "
                                     "pip install jaxckpt[safetensors].") from None
    family = hf_presets.family_of(config)
    flat = {path: np.asarray(leaf) for path, leaf in treepath.flatten(params).items()}
    tensors = {key: np.ascontiguousarray(t) for key, t in hf_presets.to_hf(family, flat).items()}
    refuse_url(out_dir, "an HF folder is written to a local disk (to upload it, copy the folder after)")
    out = pathlib.Path(out_dir).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    partial = out / f".model.safetensors.{os.getpid()}.partial"
    try:
        save_file(tensors, str(partial), metadata={"format": "pt"})  # transformers requires "pt".
        os.replace(partial, out / "model.safetensors")
    finally:
        partial.unlink(missing_ok=True)
    partial = out / f".{CONFIG_FILE}.{os.getpid()}.partial"
    partial.write_text(json.dumps(dict(config), indent=2, sort_keys=True) + "\n")
    os.replace(partial, out / CONFIG_FILE)
    return {key: tuple(tensor.shape) for key, tensor in sorted(tensors.items())}
