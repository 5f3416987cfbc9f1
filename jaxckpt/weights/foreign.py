r"""Weights from outside JAX: safetensors files and PyTorch state dicts, grafted like any checkpoint.

`read_foreign(path)` turns a file of named tensors into a flat `{"encoder/Dense_0/kernel": lazy}`
dict that `jaxckpt.grafting.graft.graft` accepts as its source. Nothing is read up front: each value is a
`LazyTensor` that knows its (converted) shape and dtype from the file header and reads its bytes
only when the graft loads it, so skipped, mismatched or unused tensors never leave the disk.
`write_safetensors(params, path)` goes the other way: it writes a params tree under the names and
in the layout that `read_foreign` maps back to the same tree, so a Flax model can be handed to
PyTorch code (or stand in for a PyTorch-trained model) and be read back strictly.

Names: a source key such as `"encoder.layers.0.weight"` becomes a tree path either through a
`rename` rule (a regex that must match the whole key, and a target path with `\1` group
references) or, when no rule matches, through the default rule:

* `.` becomes `/`;
* with `layout="torch"`, a final `weight` becomes `kernel` for tensors of 2 or more dimensions
  (Linear, Conv) and `scale` for 1-D ones (LayerNorm, BatchNorm); `bias` stays `bias`.

Layout: with `layout="torch"`, a tensor is transposed from PyTorch's layout to Flax's when read if
its source key ends in `weight` (PyTorch's name) and its tree path ends in `kernel` (by the default
rule or a rename rule): Linear `(out, in)` -> Dense `(in, out)`, Conv `(O, I, *spatial)` ->
`(*spatial, I, O)` (OIHW -> HWIO). A key that already ends in `kernel` (`"dense.kernel"`) is Flax's
name, so its tensor is taken to be in Flax's layout and read as it is; this matters for square
kernels, whose shape cannot tell the two layouts apart. Other names (`embedding`, `bias`, `scale`)
are unchanged, so an `nn.Embedding` weight needs a rule naming it `.../embedding`. `ConvTranspose` weights, which PyTorch
stores as `(I, O, *spatial)`, are not recognised: rename them to a name other than `kernel` and
convert them with a graft adapter. `layout="flax"` only turns `.` into `/`. A file written by
`write_safetensors` records its layout in the safetensors header, and reading it with `layout=None`
(the default) uses that layout; any other file is read with `"torch"`.
"""

from __future__ import annotations

import os
import re
from typing import Any, Mapping, Sequence

import numpy as np

from jaxckpt.errors import MissingDependencyError
from jaxckpt.grafting.graft import GraftReport, graft
from jaxckpt.tree import treepath
from jaxckpt.types import Params
from jaxckpt.weights.tensor_files import LazyTensor, open_safetensors, open_torch, refuse_url

RenameSpec = Mapping[str, str] | Sequence[tuple[str, str]] | None
"""`{regex: path}` or `[(regex, path), ...]`; first match wins."""

SAFETENSORS_SUFFIXES = (".safetensors",)
TORCH_SUFFIXES = (".pt", ".pth", ".bin")
_LAYOUTS = ("torch", "flax")
LAYOUT_KEY = "jaxckpt_layout"
"""Safetensors header metadata key in which `write_safetensors` records the layout it wrote."""


def rename_rules(rename: RenameSpec) -> tuple[tuple[str, str], ...]:
    r"""Checks rename rules and returns them as `((regex, path_template), ...)`.

    Args:
        rename: None, a mapping `{regex: path}` or `(regex, path)` pairs. Each regex must match a
            whole source key; the path may use `\1`-style group references. (A config's
            `"regex=>path;..."` string is parsed by `jaxckpt.config_strings.parse_rename`.)

    Returns:
        The rules in order (first match wins).

    Raises:
        TypeError: if `rename` is a string.
        ValueError: for a rule with an empty side or an invalid regex.

    Example:
        >>> rename_rules({r"fc1\.weight": "Dense_0/kernel", r"fc(\d)\.bias": r"Dense_\1/bias"})
        (('fc1\\.weight', 'Dense_0/kernel'), ('fc(\\d)\\.bias', 'Dense_\\1/bias'))
    """
    if not rename:
        return ()
    if isinstance(rename, str):
        raise TypeError(
            f"rename must be a dict {{regex: path}} or (regex, path) pairs, e.g. rename={{r'bert\\.(.*)': "
            f"r'encoder/\\1'}}; got the string {rename!r} (the 'regex=>path;...' form is for configs and "
            "command lines: parse it with jaxckpt.config_strings.parse_rename)."
        )
    pairs = list(rename.items()) if isinstance(rename, Mapping) else [tuple(p) for p in rename]
    for pattern, target in pairs:
        if not pattern or not target:
            raise ValueError(f"rename rule {pattern!r}=>{target!r} has an empty side.")
        try:
            re.compile(pattern)
        except re.error as e:
            raise ValueError(f"rename pattern {pattern!r} is not a valid regex: {e}.") from None
    return tuple(pairs)


def read_foreign(path: str | os.PathLike, *, rename: RenameSpec = None,
                 layout: str | None = None) -> dict[str, LazyTensor]:
    r"""Opens a safetensors file or PyTorch state dict as a flat, lazy `{tree_path: tensor}` dict.

    Args:
        path: a `.safetensors` file, or a `.pt`/`.pth`/`.bin` PyTorch state dict (needs torch;
            a checkpoint dict with a `"state_dict"` entry is unwrapped).
        rename: rules mapping source keys to tree paths (see `rename_rules`); keys no rule
            matches follow the default rule (module docstring).
        layout: `"torch"` (rename `weight`, transpose a `...weight` read as a `kernel` to Flax
            layout), `"flax"` (names only: `.` -> `/`), or None: the layout recorded in the file by
            `write_safetensors`, else `"torch"`.

    Returns:
        `{"encoder/Dense_0/kernel": LazyTensor, ...}`, ready as the source of `graft`.

    Raises:
        FileNotFoundError: if `path` does not exist.
        MissingDependencyError: (an `ImportError` and a `jaxckpt.errors.UserError`) for a PyTorch
            file when torch is not installed, or a safetensors file when safetensors is not.
        ValueError: for an unknown suffix or layout, a rename rule that matches no key, or two
            keys renamed to the same path.

    Example:
        >>> flat = read_foreign("mlp.safetensors", rename={r"net\.(\d+)\.weight": r"Dense_\1/kernel"})
        >>> params, report = graft(flat, fresh_params)
    """
    path = os.fspath(path)
    if layout is not None and layout not in _LAYOUTS:
        raise ValueError(f"layout={layout!r} is unknown; use one of {_LAYOUTS}.")
    refuse_url(path, "weights files (.safetensors, .pt, .pth, .bin) are read from a local disk")
    if not os.path.exists(path):
        raise FileNotFoundError(f"No weights file at {path!r}.")
    rules = rename_rules(rename)
    header: Mapping[str, str] = {}
    if path.endswith(SAFETENSORS_SUFFIXES):
        tensors, header = open_safetensors(path)
    elif path.endswith(TORCH_SUFFIXES):
        tensors = open_torch(path)
    else:
        raise ValueError(
            f"{path!r}: unknown weights format; expected a file ending in "
            f"{SAFETENSORS_SUFFIXES + TORCH_SUFFIXES}."
        )
    if layout is None:
        layout = header.get(LAYOUT_KEY, "torch")
        if layout not in _LAYOUTS:
            raise ValueError(f"{path!r}: its header says {LAYOUT_KEY}={layout!r}, which is not one of "
                             f"{_LAYOUTS}; pass layout= explicitly.")
    base = os.path.basename(path)
    compiled = [(re.compile(p), t) for p, t in rules]
    used = [False] * len(rules)
    flat: dict[str, LazyTensor] = {}
    origin: dict[str, str] = {}
    for key, (read, shape, dtype) in tensors.items():
        target = None
        for i, (regex, template) in enumerate(compiled):
            found = regex.fullmatch(key)
            if found:
                used[i] = True
                target = found.expand(template)
                break
        if target is None:
            target = _default_name(key, len(shape), layout)
        if not all(target.split("/")):
            raise ValueError(f"{path!r}: key {key!r} becomes {target!r}, which has an empty name; "
                             "paths look like 'encoder/Dense_0/kernel'.")
        if target in flat:
            raise ValueError(
                f"{path!r}: keys {origin[target]!r} and {key!r} both become {target!r}; "
                "fix the rename rules so each key gets its own path."
            )
        # Only PyTorch's own name says the tensor is in PyTorch's layout: a Flax-named `kernel` is not.
        from_torch = key.rsplit(".", 1)[-1] == "weight" and target.rsplit("/", 1)[-1] == "kernel"
        perm = _to_flax_perm(len(shape)) if layout == "torch" and from_torch else None
        flat[target] = LazyTensor(read, shape, dtype, f"{base}:{key}", perm)
        origin[target] = key
    unused = [i for i, hit in enumerate(used) if not hit]
    if unused:
        keys = list(tensors)
        shadowed = [rules[i][0] for i in unused if any(compiled[i][0].fullmatch(k) for k in keys)]
        unmatched = [rules[i][0] for i in unused if rules[i][0] not in shadowed]
        shown = ", ".join(keys[:20]) + (", ..." if len(keys) > 20 else "")
        raise ValueError(
            f"{path!r}: "
            + (f"rename rule(s) {unmatched} match no key (a rule must match a whole key). "
               if unmatched else "")
            + (f"rename rule(s) {shadowed} only match keys an earlier rule already renamed. "
               if shadowed else "")
            + f"Keys are: {shown}"
        )
    return flat


def graft_foreign(
    path: str | os.PathLike,
    target_params: Params,
    *,
    rename: RenameSpec = None,
    layout: str | None = None,
    mapping: str | Mapping[str, str] | None = None,
    skip: Sequence[str] = (),
    strict: bool = True,
    adapters: Any = None,
) -> tuple[Params, GraftReport]:
    r"""Grafts a safetensors file or PyTorch state dict into `target_params`.

    `read_foreign` followed by `jaxckpt.grafting.graft.graft`: only the tensors the graft loads are read.

    Args:
        path: the weights file (see `read_foreign`).
        target_params: the freshly initialised params (arrays or `jax.ShapeDtypeStruct`s for a
            plan that reads nothing).
        rename: source key -> tree path rules (see `rename_rules`).
        layout: `"torch"`, `"flax"` or None for the file's own (see `read_foreign`).
        mapping: source prefix -> target prefix, as in `graft`.
        skip: regexes of target paths to keep fresh, as in `graft`.
        strict: raise on any missing, mismatched or unused leaf, as in `graft`.
        adapters: shape adapters, as in `graft`.

    Returns:
        `(params, report)` as `graft` returns them.

    Raises:
        ValueError: as `read_foreign` and `graft`.
        MissingDependencyError: as `read_foreign`.

    Example:
        >>> params, report = graft_foreign("mlp.pt", task.init_params(rng),
        ...                                rename={r"net\.0\.(weight|bias)": r"encoder/Dense_0/\1"})
        >>> print(report)
    """
    source = read_foreign(path, rename=rename, layout=layout)
    return graft(source, target_params, mapping=mapping, skip=skip, strict=strict, adapters=adapters)


def is_foreign(path: str | os.PathLike) -> bool:
    """Whether `path` names a safetensors or PyTorch weights file (by its suffix).

    Example:
        >>> is_foreign("bert.safetensors"), is_foreign("runs/a/checkpoints/100")
        (True, False)
    """
    return os.fspath(path).endswith(SAFETENSORS_SUFFIXES + TORCH_SUFFIXES)


def write_safetensors(params: Params, path: str | os.PathLike, *, layout: str = "torch") -> dict[str, str]:
    """Writes a params tree to a `.safetensors` file that `read_foreign` maps back to the same tree.

    With `layout="torch"`, a leaf `a/b/kernel` is written as `a.b.weight` in PyTorch's layout
    (Dense `(in, out)` -> Linear `(out, in)`, Conv HWIO -> OIHW), a 1-D `a/b/scale` as `a.b.weight`,
    and any other leaf as `a.b.<name>` unchanged. With `layout="flax"` names only swap `/` for `.`.
    The layout is recorded in the file's header, so `read_foreign(path)` (and
    `checkpoint.pretrained=path`) reads it back without options. The file is written to a temporary
    name and renamed, so an interrupted export never leaves a truncated file at `path`.

    Args:
        params: the parameter tree (nested dicts of arrays; jax arrays are copied to the host).
        path: the file to write; it must end in `.safetensors`. An existing file is replaced.
        layout: `"torch"` or `"flax"`.

    Returns:
        `{tree_path: tensor_name}` for every leaf, in tree order.

    Raises:
        ValueError: for an unknown layout, a path not ending in `.safetensors`, an empty tree, or a
            leaf whose name would not read back as the same path (a name containing `.`, or with
            `layout="torch"` a leaf named `weight`): the message names the leaf; `layout="flax"`
            avoids the second case.
        MissingDependencyError: (an `ImportError`) if safetensors is not installed.

    Example:
        >>> write_safetensors({"head": {"kernel": np.ones((16, 10)), "bias": np.zeros(10)}}, "m.safetensors")
        {'head/bias': 'head.bias', 'head/kernel': 'head.weight'}
        >>> read_foreign("m.safetensors")["head/kernel"].shape   # transposed back
        (16, 10)
    """
    path = os.fspath(path)
    if layout not in _LAYOUTS:
        raise ValueError(f"layout={layout!r} is unknown; use one of {_LAYOUTS}.")
    if not path.endswith(SAFETENSORS_SUFFIXES):
        raise ValueError(f"{path!r}: a safetensors file must end in '.safetensors'.")
    try:
        from safetensors.numpy import save_file
    except ImportError:
        raise MissingDependencyError(
            f"Writing {path!r} needs the safetensors package: pip install jaxckpt[safetensors]."
        ) from None
    flat = treepath.flatten(params)
    if not flat:
        raise ValueError(f"{path!r}: the params tree has no leaf; there is nothing to write.")
    tensors, names = {}, {}
    for tree_path, leaf in flat.items():
        array = np.asarray(leaf)
        name, perm = _export_name(tree_path, array.ndim, layout)
        # Export is only useful if reading it back gives the same tree; refuse names that would not.
        if "." in tree_path or _default_name(name, array.ndim, layout) != tree_path:
            raise ValueError(
                f"{path!r}: leaf {tree_path!r} {array.shape} would be written as {name!r}, which reads "
                f"back as {_default_name(name, array.ndim, layout)!r} with layout={layout!r}. "
                + ("Names must not contain '.'; rename the module." if "." in tree_path else
                   "Export with layout='flax', which keeps every name as it is.")
            )
        tensors[name] = np.ascontiguousarray(array if perm is None else np.transpose(array, perm))
        names[tree_path] = name
    header = {"format": "pt" if layout == "torch" else "flax", LAYOUT_KEY: layout}
    from jaxckpt.checkpoint import storage  # (imports Orbax: only when writing)

    if storage.is_url(path):  # one upload, applied whole: no partial file to rename
        from safetensors.numpy import save

        storage.write_bytes_atomic(storage.run_path(path), save(tensors, metadata=header))
        return names
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    partial = os.path.join(directory, f".{os.path.basename(path)}.{os.getpid()}.partial")
    try:
        save_file(tensors, partial, metadata=header)
        os.replace(partial, path)
    finally:
        if os.path.exists(partial):
            os.remove(partial)
    return names


def _export_name(tree_path: str, ndim: int, layout: str) -> tuple[str, tuple[int, ...] | None]:
    """The tensor name of `tree_path` and the permutation from Flax to the file's layout."""
    names = tree_path.split("/")
    perm = None
    if layout == "torch":
        if names[-1] == "kernel" and ndim >= 2:
            names[-1] = "weight"
            perm = tuple(int(i) for i in np.argsort(_to_flax_perm(ndim)))
        elif names[-1] == "scale" and ndim == 1:
            names[-1] = "weight"
    return ".".join(names), perm


def _default_name(key: str, ndim: int, layout: str) -> str:
    names = key.split(".")
    if layout == "torch" and names[-1] == "weight":
        names[-1] = "kernel" if ndim >= 2 else "scale"
    return "/".join(names)


def _to_flax_perm(ndim: int) -> tuple[int, ...] | None:
    if ndim == 2:
        return (1, 0)
    if ndim >= 3:  # (O, I, *spatial) -> (*spatial, I, O)
        return tuple(range(2, ndim)) + (1, 0)
    return None
