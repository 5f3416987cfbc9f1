"""Hugging Face -> Flax weight conversion as data: one table of rules per model family.

A rule is `(hf_pattern, flax_paths, layout)`:

* `hf_pattern`: an HF state-dict key in which each part that varies (a layer index) is a `{name}`
  placeholder matching a decimal number, e.g. `"encoder.layer.{i}.attention.self.query.weight"`.
  It must match the whole key. Placeholders rather than free regexes, so that the same rule also
  runs backwards (`to_hf`).
* `flax_paths`: the flat Flax path (`"/"`-separated, relative to the params root) it becomes, with
  the same placeholders, e.g. `"encoder/layer_{i}/attention/query/kernel"`; a tuple of N paths for
  a `("split", N, axis)` layout.
* `layout`: how the tensor changes on the way, one of
    - `"none"`: as it is;
    - `"transpose"`: PyTorch `Linear` `(out, in)` -> Flax `Dense` `(in, out)`;
    - `"conv_oihw_to_hwio"`: PyTorch `Conv2d` `(out, in, h, w)` -> Flax `Conv` `(h, w, in, out)`;
    - `("split", N, axis)`: a fused tensor cut into N equal parts along `axis`, one per Flax path
      (GPT-2's `c_attn` -> query, key, value), by the graft's structural adapter `Split`; its
      inverse is `Fuse`.

`PRESETS[family]` holds a family's rules and the HF keys it ignores (buffers that some files hold
but that are not parameters). `match(family, keys)` plans a file: where each key goes, and the
`Split` rules of the fused ones, so that `load_params("hf:DIR", ...)` reads each tensor lazily
through the graft. `convert(family, tensors)` applies a family's table eagerly and
`to_hf(family, flat_params)` inverts it; all three are strict: a tensor that no rule uses, or a rule
that matches nothing, is an error that names it.

Example:
    >>> rules = PRESETS["gpt2_lm_head"].rules
    >>> [rule for rule in rules if "c_attn.weight" in rule[0]]  # doctest: +NORMALIZE_WHITESPACE
    [('transformer.h.{i}.attn.c_attn.weight',
      ('transformer/h_{i}/attention/query/kernel', 'transformer/h_{i}/attention/key/kernel',
       'transformer/h_{i}/attention/value/kernel'), ('split', 3, 1))]
"""

from __future__ import annotations

import re
from typing import Mapping, NamedTuple, Sequence

import numpy as np

from jaxckpt.grafting.structure import Derived, Fuse, Split, restructure

Layout = str | tuple[str, int, int]
"""`"none"`, `"transpose"`, `"conv_oihw_to_hwio"` or `("split", parts, axis)`."""
Rule = tuple[str, str | tuple[str, ...], Layout]
"""`(hf_pattern, flax_path or (flax_path, ...), layout)`."""


class Preset(NamedTuple):
    """A family's conversion table.

    Attributes:
        rules: the `(hf_pattern, flax_paths, layout)` rules; each must match at least one key.
        ignored: HF key patterns dropped without a rule (non-parameter buffers); optional.
    """

    rules: tuple[Rule, ...]
    ignored: tuple[str, ...] = ()


def _prefixed(hf_prefix: str, flax_prefix: str, rules: tuple[Rule, ...]) -> tuple[Rule, ...]:
    """The rules of a base model nested in a task model (HF `bert.`, Flax `bert/`)."""
    out = []
    for hf_pattern, flax_paths, layout in rules:
        if isinstance(flax_paths, str):
            flax_paths = flax_prefix + flax_paths
        else:
            flax_paths = tuple(flax_prefix + path for path in flax_paths)
        out.append((hf_prefix + hf_pattern, flax_paths, layout))
    return tuple(out)


def _dense(hf_module: str, flax_module: str) -> tuple[Rule, ...]:
    """A PyTorch `Linear` as a Flax `Dense`."""
    return ((f"{hf_module}.weight", f"{flax_module}/kernel", "transpose"),
            (f"{hf_module}.bias", f"{flax_module}/bias", "none"))


def _norm(hf_module: str, flax_module: str) -> tuple[Rule, ...]:
    """A PyTorch `LayerNorm` as a Flax `LayerNorm`."""
    return ((f"{hf_module}.weight", f"{flax_module}/scale", "none"),
            (f"{hf_module}.bias", f"{flax_module}/bias", "none"))


def _embed(hf_module: str, flax_module: str) -> tuple[Rule, ...]:
    """A PyTorch `Embedding` as a Flax `Embed`."""
    return ((f"{hf_module}.weight", f"{flax_module}/embedding", "none"),)


def _attention(hf_self: str, hf_output: str, flax: str) -> tuple[Rule, ...]:
    """BERT/ViT self-attention: separate query, key, value and output `Linear`s."""
    return (_dense(f"{hf_self}.query", f"{flax}/query") + _dense(f"{hf_self}.key", f"{flax}/key")
            + _dense(f"{hf_self}.value", f"{flax}/value") + _dense(hf_output, f"{flax}/output"))


_BERT = (
    _embed("embeddings.word_embeddings", "embeddings/word_embeddings")
    + _embed("embeddings.position_embeddings", "embeddings/position_embeddings")
    + _embed("embeddings.token_type_embeddings", "embeddings/token_type_embeddings")
    + _norm("embeddings.LayerNorm", "embeddings/norm")
    + _attention("encoder.layer.{i}.attention.self", "encoder.layer.{i}.attention.output.dense",
                 "encoder/layer_{i}/attention")
    + _norm("encoder.layer.{i}.attention.output.LayerNorm", "encoder/layer_{i}/attention_norm")
    + _dense("encoder.layer.{i}.intermediate.dense", "encoder/layer_{i}/intermediate")
    + _dense("encoder.layer.{i}.output.dense", "encoder/layer_{i}/output")
    + _norm("encoder.layer.{i}.output.LayerNorm", "encoder/layer_{i}/mlp_norm")
    + _dense("pooler.dense", "pooler")
)
# Older transformers saved `position_ids` as a persistent buffer.
_BERT_BUFFERS = ("embeddings.position_ids",)

_VIT = (
    (("embeddings.cls_token", "embeddings/cls_token", "none"),
     ("embeddings.position_embeddings", "embeddings/position_embeddings", "none"),
     ("embeddings.patch_embeddings.projection.weight", "embeddings/patch_embeddings/kernel",
      "conv_oihw_to_hwio"),
     ("embeddings.patch_embeddings.projection.bias", "embeddings/patch_embeddings/bias", "none"))
    + _norm("encoder.layer.{i}.layernorm_before", "encoder/layer_{i}/attention_norm")
    + _attention("encoder.layer.{i}.attention.attention",
                 "encoder.layer.{i}.attention.output.dense", "encoder/layer_{i}/attention")
    + _norm("encoder.layer.{i}.layernorm_after", "encoder/layer_{i}/mlp_norm")
    + _dense("encoder.layer.{i}.intermediate.dense", "encoder/layer_{i}/intermediate")
    + _dense("encoder.layer.{i}.output.dense", "encoder/layer_{i}/output")
    + _norm("layernorm", "norm")
)


def _conv1d(hf_module: str, flax_module: str) -> tuple[Rule, ...]:
    """GPT-2's `Conv1D`: a `Linear` that already stores its weight `(in, out)`, as Flax does."""
    return ((f"{hf_module}.weight", f"{flax_module}/kernel", "none"),
            (f"{hf_module}.bias", f"{flax_module}/bias", "none"))


_GPT2_QKV = tuple(f"h_{{i}}/attention/{name}" for name in ("query", "key", "value"))
# The language-model head is tied to `wte` (Flax: `wte.attend`), so the file has no `lm_head`.
_GPT2 = (
    _embed("wte", "wte") + _embed("wpe", "wpe")
    + _norm("h.{i}.ln_1", "h_{i}/attention_norm")
    + (("h.{i}.attn.c_attn.weight", tuple(f"{path}/kernel" for path in _GPT2_QKV), ("split", 3, 1)),
       ("h.{i}.attn.c_attn.bias", tuple(f"{path}/bias" for path in _GPT2_QKV), ("split", 3, 0)))
    + _conv1d("h.{i}.attn.c_proj", "h_{i}/attention/output")
    + _norm("h.{i}.ln_2", "h_{i}/mlp_norm")
    + _conv1d("h.{i}.mlp.c_fc", "h_{i}/intermediate")
    + _conv1d("h.{i}.mlp.c_proj", "h_{i}/output")
    + _norm("ln_f", "norm")
)
# Older transformers saved the causal mask (`attn.bias`) and `attn.masked_bias` as buffers.
_GPT2_BUFFERS = ("h.{i}.attn.bias", "h.{i}.attn.masked_bias")

PRESETS: dict[str, Preset] = {
    "bert": Preset(_BERT, _BERT_BUFFERS),
    "bert_sequence_classifier": Preset(
        _prefixed("bert.", "bert/", _BERT) + _dense("classifier", "classifier"),
        tuple("bert." + key for key in _BERT_BUFFERS)),
    "vit_image_classifier": Preset(
        _prefixed("vit.", "vit/", _VIT) + _dense("classifier", "classifier")),
    "gpt2_lm_head": Preset(
        _prefixed("transformer.", "transformer/", _GPT2),
        tuple("transformer." + key for key in _GPT2_BUFFERS)),
}
"""Conversion tables by family; `family_of(config)` names the family of an HF `config.json`."""

_ARCHITECTURES = {
    "BertModel": "bert",
    "BertForSequenceClassification": "bert_sequence_classifier",
    "ViTForImageClassification": "vit_image_classifier",
    "GPT2LMHeadModel": "gpt2_lm_head",
}
# A config without `architectures` is taken to be the base model of its `model_type`.
_MODEL_TYPES = {"bert": "bert"}

LAYOUTS = ("none", "transpose", "conv_oihw_to_hwio", ("split", "N", "axis"))
"""The layouts a rule may give (`N` and `axis` are integers)."""

PERMUTATIONS = {"none": None, "transpose": (1, 0), "conv_oihw_to_hwio": (2, 3, 1, 0)}
"""Axis permutation from HF's layout to Flax's, by layout (None: as it is)."""


def family_of(config: Mapping) -> str:
    """The family (key of `PRESETS`) of an HF model, from its `config.json`.

    Args:
        config: the parsed `config.json`.

    Returns:
        The family, from `architectures[0]`, or from `model_type` when there is no architecture.

    Raises:
        ValueError: if neither names a model with a preset.

    Example:
        >>> family_of({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]})
        'gpt2_lm_head'
    """
    architectures = config.get("architectures") or []
    if architectures:
        if architectures[0] in _ARCHITECTURES:
            return _ARCHITECTURES[architectures[0]]
        raise ValueError(f"config.json names architecture {architectures[0]!r}, which has no "
                         f"conversion preset; supported: {sorted(_ARCHITECTURES)}.")
    model_type = config.get("model_type")
    if model_type in _MODEL_TYPES:
        return _MODEL_TYPES[model_type]
    raise ValueError(f"config.json has no 'architectures' and model_type {model_type!r} has no "
                     f"base-model preset; supported architectures: {sorted(_ARCHITECTURES)}.")


def _compile(pattern: str) -> re.Pattern:
    """A `{name}` pattern as a regex for a whole key or path, each placeholder a decimal number."""
    parts = re.split(r"\{(\w+)\}", pattern)
    return re.compile("".join(re.escape(part) if i % 2 == 0 else rf"(?P<{part}>\d+)"
                              for i, part in enumerate(parts)))


def _checked(rule: Rule) -> tuple[str, tuple[str, ...], Layout]:
    """`(hf_pattern, flax_paths as a tuple, layout)`; raises for a layout outside `LAYOUTS`."""
    hf_pattern, flax, layout = rule
    paths = (flax,) if isinstance(flax, str) else tuple(flax)
    if isinstance(layout, str) and layout in PERMUTATIONS and len(paths) == 1:
        return hf_pattern, paths, layout
    if (isinstance(layout, tuple) and len(layout) == 3 and layout[0] == "split"
            and all(isinstance(n, int) for n in layout[1:]) and layout[1] == len(paths) > 1):
        return hf_pattern, paths, layout
    raise ValueError(f"Rule for {hf_pattern!r} has layout {layout!r} with {len(paths)} Flax "
                     f"path(s); use one of {LAYOUTS}, with one Flax path per split part.")


def _preset(family: str) -> Preset:
    if family not in PRESETS:
        raise ValueError(f"No conversion preset for family {family!r}; known: {sorted(PRESETS)}.")
    return PRESETS[family]


def _unmatched_error(family: str, direction: str, unused: list[str], idle: list[str]) -> ValueError:
    lines = [f"Converting {direction} with preset {family!r} is not exact:"]
    if unused:
        lines.append(f"  {len(unused)} tensor(s) no rule uses: {unused}")
    if idle:
        lines.append(f"  {len(idle)} rule(s) that matched nothing: {idle}")
    lines.append("  The file is not of this family, or the preset misses a rule; check "
                 "family_of(config) and the preset's table.")
    return ValueError("\n".join(lines))


class Plan(NamedTuple):
    """Where each HF tensor goes (from `match`).

    Attributes:
        paths: HF key -> `(path, permutation)`: the Flax path of a plain tensor, with the axis
            permutation that takes it to Flax's layout (None: as it is); a fused tensor keeps its
            HF key as its path, for a `Split` in `structure` to cut.
        structure: the `Split` rules of the fused tensors, for `graft(..., structure=...)`.
    """

    paths: dict[str, tuple[str, tuple[int, ...] | None]]
    structure: tuple[Split, ...]


def match(family: str, keys: Sequence[str], rules: tuple[Rule, ...] | None = None) -> Plan:
    """Plans the conversion of an HF file's tensors by name alone; reads nothing.

    Args:
        family: a key of `PRESETS`.
        keys: the HF keys in the file.
        rules: rules to apply instead of the family's (its ignored keys still apply).

    Returns:
        The `Plan`: each key's path and permutation, and the structural rules. Ignored keys are
        left out.

    Raises:
        ValueError: naming every key that no rule uses and every rule that matched nothing.

    Example:
        >>> rules = [rule for rule in PRESETS["gpt2_lm_head"].rules if "c_attn.b" in rule[0]]
        >>> plan = match("gpt2_lm_head", ["transformer.h.0.attn.c_attn.bias"], rules=tuple(rules))
        >>> plan.paths["transformer.h.0.attn.c_attn.bias"], plan.structure[0].targets[0]
        (('transformer.h.0.attn.c_attn.bias', None), 'transformer/h_{i}/attention/query/bias')
    """
    preset = _preset(family)
    checked = [_checked(rule) for rule in (preset.rules if rules is None else rules)]
    compiled = [(_compile(hf), paths, layout) for hf, paths, layout in checked]
    ignored = [_compile(pattern) for pattern in preset.ignored]
    paths: dict[str, tuple[str, tuple[int, ...] | None]] = {}
    source: dict[str, str] = {}
    used_rules: set[int] = set()
    unused: list[str] = []
    for key in sorted(keys):
        for index, (regex, flax, layout) in enumerate(compiled):
            found = regex.fullmatch(key)
            if found is None:
                continue
            used_rules.add(index)
            if isinstance(layout, tuple):
                paths[key] = (key, None)  # Cut by the rule's Split, through the graft.
            else:
                path = flax[0].format(**found.groupdict())
                if path in source:
                    raise ValueError(f"{key!r} and {source[path]!r} both convert to {path!r}.")
                paths[key], source[path] = (path, PERMUTATIONS[layout]), key
            break
        else:
            if not any(regex.fullmatch(key) for regex in ignored):
                unused.append(key)
    idle = [checked[i][0] for i in range(len(checked)) if i not in used_rules]
    if unused or idle:
        raise _unmatched_error(family, "HF -> Flax", unused, idle)
    structure = tuple(Split(hf, flax, layout[2]) for i, (hf, flax, layout) in enumerate(checked)
                      if isinstance(layout, tuple) and i in used_rules)
    return Plan(paths, structure)


def _permuted(tensor: np.ndarray, perm: tuple[int, ...] | None, key: str) -> np.ndarray:
    tensor = np.asarray(tensor)
    if perm is None:
        return tensor
    if tensor.ndim != len(perm):
        raise ValueError(f"{key!r} has shape {tensor.shape}; its layout needs {len(perm)} axes.")
    return np.ascontiguousarray(tensor.transpose(perm))


def convert(family: str, tensors: Mapping[str, np.ndarray],
            rules: tuple[Rule, ...] | None = None) -> dict[str, np.ndarray]:
    """Converts an HF state dict to flat Flax params with a family's table.

    Args:
        family: a key of `PRESETS`.
        tensors: HF key -> array (e.g. from `safetensors.numpy.load_file`).
        rules: rules to apply instead of the family's (its ignored keys still apply); for tests
            and for presets under construction.

    Returns:
        Flat Flax path (`"a/b/c"`) -> array.

    Raises:
        ValueError: naming every tensor that no rule uses and every rule that matched nothing,
            or a tensor whose shape its layout cannot take, or two tensors mapped to one path.

    Example:
        >>> linear = {"pooler.dense.weight": np.zeros((3, 2)), "pooler.dense.bias": np.zeros(3)}
        >>> rules = (("pooler.dense.weight", "pooler/kernel", "transpose"),
        ...          ("pooler.dense.bias", "pooler/bias", "none"))
        >>> convert("bert", linear, rules=rules)["pooler/kernel"].shape
        (2, 3)
    """
    plan = match(family, list(tensors), rules)
    flat = {path: _permuted(tensors[key], perm, key) for key, (path, perm) in plan.paths.items()}
    flat = restructure(flat, plan.structure)
    return {path: leaf() if isinstance(leaf, Derived) else leaf for path, leaf in flat.items()}


def to_hf(family: str, flat_params: Mapping[str, np.ndarray],
          rules: tuple[Rule, ...] | None = None) -> dict[str, np.ndarray]:
    """Converts flat Flax params back to an HF state dict: the inverse of `convert`.

    Split tensors are joined back by the graft's `Fuse`, transposed ones transposed back; tied
    weights (GPT-2's LM head) are not written, as `save_pretrained` does not write them either.

    Args:
        family: a key of `PRESETS`.
        flat_params: flat Flax path (`"a/b/c"`) -> array.
        rules: rules to apply instead of the family's.

    Returns:
        HF key -> array.

    Raises:
        ValueError: naming every Flax path that no rule uses and every rule that matched nothing,
            or a split rule of which only some parts are present.

    Example:
        >>> qkv = {f"h_0/attention/{name}/bias": np.full(2, i) for i, name in enumerate("qkv")}
        >>> rules = (("h.{i}.attn.c_attn.bias", tuple(f"h_{{i}}/attention/{name}/bias"
        ...                                           for name in "qkv"), ("split", 3, 0)),)
        >>> to_hf("gpt2_lm_head", qkv, rules=rules)
        {'h.0.attn.c_attn.bias': array([0, 0, 1, 1, 2, 2])}
    """
    checked = [_checked(rule) for rule in (_preset(family).rules if rules is None else rules)]
    fuses = [Fuse(flax, hf, layout[2]) for hf, flax, layout in checked if isinstance(layout, tuple)]
    present = [fuse for fuse in fuses if any(_compile(fuse.sources[0]).fullmatch(p) for p in flat_params)]
    flat = restructure({p: np.asarray(v) for p, v in flat_params.items()}, present)
    plain = [(hf, _compile(flax[0]), layout) for hf, flax, layout in checked if isinstance(layout, str)]
    out: dict[str, np.ndarray] = {}
    used_rules = {hf for hf, _, layout in checked if isinstance(layout, tuple)
                  and any(f.target == hf for f in present)}
    unused: list[str] = []
    for path in sorted(flat):
        leaf = flat[path]
        if isinstance(leaf, Derived):  # A fused tensor, already under its HF key.
            out[path] = leaf()
            continue
        for hf, regex, layout in plain:
            found = regex.fullmatch(path)
            if found is None:
                continue
            perm = PERMUTATIONS[layout]
            inverse = None if perm is None else tuple(int(i) for i in np.argsort(perm))
            out[hf.format(**found.groupdict())] = _permuted(leaf, inverse, path)
            used_rules.add(hf)
            break
        else:
            unused.append(path)
    idle = [hf for hf, _, _ in checked if hf not in used_rules]
    if unused or idle:
        raise _unmatched_error(family, "Flax -> HF", unused, idle)
    return out
