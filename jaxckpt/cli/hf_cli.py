"""The Hugging Face parts of the command line: `inspect hf:DIR` and `export RUN --format hf OUT/`."""

from __future__ import annotations

import json
import os
import typing
from typing import Any

import jax

import jaxckpt.cli.tables as cli_tables
from jaxckpt.checkpoint.stepdir import EXTRA_ITEM, read_json_item
from jaxckpt.errors import UserError
from jaxckpt.grafting.structure import Derived, restructure
from jaxckpt.weights import hf

if typing.TYPE_CHECKING:
    from jaxckpt.checkpoint.storage import AnyPath


def inspect_hf(path: str) -> str:
    """What `inspect hf:DIR` prints: the family, the files, and every Flax leaf with its HF tensor.

    Reads `config.json` and the weight files' headers only. Fused tensors are listed as the leaves
    the graft cuts them into, each with its rule.
    """
    source = hf.open_hf(path)
    flat = restructure(source.leaves, source.structure)
    rows = []
    for name, leaf in sorted(flat.items()):
        origin = leaf.rule if isinstance(leaf, Derived) else leaf.source.split(":", 1)[1]
        rows.append([name, origin, str(leaf.shape), leaf.dtype.name])
    names = source.config.get("architectures") or [source.config.get("model_type", "?")]
    abstract = {p: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype) for p, leaf in flat.items()}
    totals = cli_tables.state_table(abstract, show_all=True).split("\n\n", 1)[1]
    return "\n".join([
        f"hf folder:   {source.folder}",
        f"family:      {source.family} ({', '.join(names)})",
        f"files:       {', '.join(source.files)}",
        "",
        "params (from config.json and the file headers; no array is read):",
        cli_tables.table(rows, ["path", "from", "shape", "dtype"]),
        "",
        totals,
    ])


def hf_config_of(step_dir: AnyPath | os.PathLike, hf_config: str | None) -> dict[str, Any]:
    """The HF `config.json` of an export: the file `hf_config`, else the step's `hf_config` artifact.

    Raises:
        UserError: if neither is there, saying how to pass one.
    """
    if hf_config:
        from jaxckpt.checkpoint import storage

        return json.loads(storage.run_path(hf_config, key="--hf-config").read_text())
    artifacts = (read_json_item(step_dir, EXTRA_ITEM) or {}).get("task_artifacts") or {}
    if "hf_config" not in artifacts:
        raise UserError(
            f"--format hf needs the model's HF config.json, and step {step_dir} does not record one "
            f"(its task artifacts: {sorted(artifacts) or 'none'}; tasks built from an HF config save "
            "it as 'hf_config'). Pass --hf-config PATH/TO/config.json.")
    return artifacts["hf_config"]


def export_step(params: Any, step_dir: AnyPath | os.PathLike, out: str, hf_config: str | None,
                described: str) -> str:
    """Writes a step's params as an HF folder at `out`; returns what `export --format hf` prints."""
    written = hf.export_hf(params, hf_config_of(step_dir, hf_config), out)
    rows = [[key, str(shape)] for key, shape in written.items()]
    return "\n".join([
        (f"exported the params of step {step_dir.name} ({described}) as the HF folder {out}: "
         f"config.json and model.safetensors, {len(written)} tensors"),
        cli_tables.table(rows, ["tensor", "shape"]),
        "",
        (f"load it with transformers' from_pretrained({out!r}), or into a model with "
         f"--config.checkpoint.pretrained=hf:{out}"),
    ])
