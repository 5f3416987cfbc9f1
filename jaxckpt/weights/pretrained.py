"""Weights-only loading: graft a checkpoint's params into a new model, reading only what is used.

`load_params` takes every weights source the loop's `checkpoint.pretrained` takes: a jaxckpt run,
checkpoint or step directory (or its `state/` item), `zoo:NAME`, a bare Orbax PyTree checkpoint of
params, a `.safetensors` file or a PyTorch state dict. It reads the source's metadata, plans the
graft on abstract leaves (`graft.plan`), then reads only the arrays the plan loads: from Orbax with
a partial restore, each straight onto the sharding of the target leaf it fills; from a weights file
tensor by tensor. Optimizer state and unused params are never read. `hf:DIR` names a Hugging Face
folder (`jaxckpt.weights.hf`), converted by its family's table on the way.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable, Mapping, Sequence

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from jaxckpt.checkpoint import integrity, orbax_s3, state_read, storage
from jaxckpt.checkpoint.retention import RetentionPolicy
from jaxckpt.checkpoint.stepdir import STATE_ITEM, read_json_item, read_state_metadata
from jaxckpt.checkpoint.writers import COMMIT_FILE
from jaxckpt.errors import CheckpointNotFoundError
from jaxckpt.grafting.graft import GraftReport, graft, plan
from jaxckpt.grafting.structure import Derived, StructureRule, restructure
from jaxckpt.tree import treepath
from jaxckpt.types import Params
from jaxckpt.weights import hf, zoo
from jaxckpt.weights.foreign import RenameSpec, is_foreign, read_foreign
from jaxckpt.weights.tensor_files import refuse_url

PARAMS_KEY = "params"
_EXPECTED = (
    "a run directory (holding checkpoints/), a checkpoint directory (holding <step>/ folders), "
    "a step directory (holding state/) or its state/ item"
)
# Files Orbax writes at the top of every PyTree checkpoint (the state item included).
_ORBAX_MARKERS = ("_METADATA", "manifest.ocdbt")


def _is_step_dir(path: storage.AnyPath) -> bool:
    return (path / STATE_ITEM).is_dir()


def is_committed(step_dir: storage.AnyPath) -> bool:
    """Whether a step directory is a finished save: always locally (Orbax renames it into place
    once written); on `gs://`/`s3://` only once Orbax's commit marker is in it."""
    return not storage.is_url(step_dir) or (step_dir / COMMIT_FILE).exists()


def _is_state_item(path: storage.AnyPath) -> bool:
    """`.../<step>/state`: the state item of a step directory named by its step."""
    return path.name == STATE_ITEM and path.parent.name.isdigit() and path.is_dir()


def _is_orbax_tree(path: storage.AnyPath) -> bool:
    """A bare Orbax PyTree checkpoint (e.g. `ocp.StandardCheckpointer().save(path, params)`)."""
    return not _is_step_dir(path) and any((path / name).is_file() for name in _ORBAX_MARKERS)


def _steps_in(checkpoint_dir: storage.AnyPath) -> list[int]:
    """Committed steps: integer-named folders with a state item (unfinished saves have other names
    locally, and no commit marker on an object store)."""
    if not checkpoint_dir.is_dir():
        return []
    return sorted(int(p.name) for p in checkpoint_dir.iterdir()
                  if p.name.isdigit() and _is_step_dir(p) and is_committed(p))


def resolve_checkpoint_path(path: os.PathLike | str, *, key: str | None = None) -> tuple[storage.AnyPath, int | None]:
    """Finds the checkpoint directory (and step, if the path names one) behind a user's path.

    Args:
      path: a run directory (`WORKDIR`, holding `checkpoints/`), a checkpoint directory (holding
        `<step>/` folders), one step directory (`.../checkpoints/<step>`, holding `state/`), the
        state item of one (`.../checkpoints/<step>/state`: that step), or `zoo:NAME` (that zoo
        entry's step); local, or a `gs://` / `s3://` URL.
      key: the config key the path came from (e.g. "checkpoint.resume_file"), named in errors.

    Returns:
      `(checkpoint_dir, step)`: `checkpoint_dir` is a `pathlib.Path`, or an `epath.Path` for a
      URL (`storage.run_path`); `step` is the step the path names, or None when the caller picks
      (latest or best).

    Raises:
      CheckpointNotFoundError: if the path does not exist or holds no checkpoint.
      UserError: for a URL of another scheme than gs:// and s3://, naming `key`.

    Example:
      >>> resolve_checkpoint_path("gs://bucket/runs/digits/checkpoints/300")
      (PosixGPath('gs://bucket/runs/digits/checkpoints'), 300)
      >>> resolve_checkpoint_path("runs/digits")
      (PosixPath('/abs/runs/digits/checkpoints'), None)
      >>> resolve_checkpoint_path("runs/digits/checkpoints/300")
      (PosixPath('/abs/runs/digits/checkpoints'), 300)
      >>> resolve_checkpoint_path("runs/digits/checkpoints/300/state")
      (PosixPath('/abs/runs/digits/checkpoints'), 300)
    """
    given = os.fspath(path)
    path = zoo.resolve(given) if zoo.is_ref(given) else storage.run_path(given, key=key)
    if not path.exists():
        where = f"{key}={given}: checkpoint path" if key else "Checkpoint path"
        raise CheckpointNotFoundError(f"{where} {path} does not exist; expected {_EXPECTED}.")
    if _is_state_item(path):
        path = path.parent
    if _is_step_dir(path):
        if not path.name.isdigit():
            raise CheckpointNotFoundError(
                f"{path} looks like a step directory (it holds state/) but its name is not a step "
                "number; rename it to its step (e.g. .../checkpoints/300)."
            )
        if not is_committed(path):
            raise CheckpointNotFoundError(
                f"{path} has no {COMMIT_FILE}: its save is still running or was killed. Wait for it, "
                "or name another step.")
        return path.parent, int(path.name)
    if (path / "checkpoints").is_dir():
        return path / "checkpoints", None
    if _steps_in(path):
        return path, None
    found = sorted(p.name for p in path.iterdir())[:10] if path.is_dir() else []
    raise CheckpointNotFoundError(f"{path} holds no checkpoint; expected {_EXPECTED}. It holds: {found or 'nothing'}.")


def resolve_step_dir(
    path: os.PathLike | str,
    step: int | str | None = None,
    *,
    best_metric: str | None = None,
    best_mode: str = "min",
) -> storage.AnyPath:
    """The step directory to read for `path` and `step`.

    Args:
      path: as for `resolve_checkpoint_path`.
      step: None or "latest" (the newest step, unless `path` names one), "best", or a step number.
      best_metric: the metric that ranks steps for `step="best"`.
      best_mode: "min" or "max" for `step="best"`.

    Returns:
      The step directory (holding `state/`).

    Raises:
      CheckpointNotFoundError: if there is no such step; the message lists the steps there are.
      ValueError: for `step="best"` without `best_metric`, or a step conflicting with the path.
    """
    checkpoint_dir, named = resolve_checkpoint_path(path)
    steps = _steps_in(checkpoint_dir)
    if named is not None:
        if step not in (None, "latest", named):
            raise ValueError(f"{path} names step {named}, but step={step!r} was asked; pass one or the other.")
        return checkpoint_dir / str(named)
    policy = RetentionPolicy(best_metric=best_metric, best_mode=best_mode)
    metrics = lambda: {s: read_json_item(checkpoint_dir / str(s), "metrics") for s in steps}  # noqa: E731
    return checkpoint_dir / str(policy.pick(step, steps, metrics, str(checkpoint_dir)))


def _sharding_of(leaf: Any) -> jax.sharding.Sharding | None:
    return getattr(leaf, "sharding", None) if isinstance(leaf, (jax.Array, jax.ShapeDtypeStruct)) else None


def _item_dir(checkpoint: storage.AnyPath) -> storage.AnyPath:
    """The Orbax PyTree of a step directory (its state item) or of a bare PyTree checkpoint."""
    return checkpoint / STATE_ITEM if _is_step_dir(checkpoint) else checkpoint


def _read_metadata(checkpoint: storage.AnyPath) -> dict[str, jax.ShapeDtypeStruct]:
    """Shapes and dtypes of a step directory's state or a bare PyTree checkpoint; reads no array."""
    if _is_step_dir(checkpoint):
        return read_state_metadata(checkpoint)
    def read() -> Any:
        with orbax_s3.for_path(checkpoint):  # Orbax 0.12.8 reads s3:// only through it
            return ocp.PyTreeCheckpointHandler().metadata(epath.Path(checkpoint)).tree

    tree = integrity.read_step(checkpoint, read, what="the array metadata")
    return {p: jax.ShapeDtypeStruct(tuple(m.shape), np.dtype(m.dtype)) for p, m in treepath.flatten(tree).items()}


def _read_arrays(
    checkpoint: storage.AnyPath, wanted: Mapping[str, tuple[jax.ShapeDtypeStruct, jax.sharding.Sharding | None]]
) -> dict[str, Any]:
    """Partial Orbax restore of the `wanted` tree paths only, each onto its sharding (or as numpy).

    `checkpoint` is a step directory (its state item is read) or a bare PyTree checkpoint.
    """
    if not wanted:
        return {}
    item_dir = _item_dir(checkpoint)
    if state_read.layout_arrays(item_dir) is not None and jax.process_count() == 1:
        # Written by jaxckpt: one batch of key reads, no Orbax restore machinery.
        cast = {p: (saved.dtype, sharding) for p, (saved, sharding) in wanted.items()}
        return integrity.read_step(checkpoint, lambda: state_read.read_arrays(item_dir, cast), what="the params")
    items, args = {}, {}
    for path, (saved, sharding) in wanted.items():
        items[path] = jax.ShapeDtypeStruct(saved.shape, saved.dtype, sharding=sharding)
        if sharding is None:
            args[path] = ocp.RestoreArgs(restore_type=np.ndarray, dtype=saved.dtype)
        else:
            args[path] = ocp.ArrayRestoreArgs(sharding=sharding, global_shape=saved.shape, dtype=saved.dtype)
    restore = ocp.args.PyTreeRestore(item=treepath.unflatten_dict(items), restore_args=treepath.unflatten_dict(args),
                                     partial_restore=True)
    def read() -> Any:
        with orbax_s3.for_path(item_dir):
            return ocp.PyTreeCheckpointHandler().restore(epath.Path(item_dir), args=restore)

    restored = integrity.read_step(checkpoint, read, what="the params")
    flat = treepath.flatten(restored)
    return {path: flat[path] for path in wanted}


_Reader = Callable[[Mapping[str, Any]], dict[str, Any]]


def _one_weights_set(path: Any, step: int | str | None, what: str) -> None:
    if step not in (None, "latest"):
        raise ValueError(
            f"{path} is {what}, which holds one set of weights; step={step!r} applies only to run and "
            "checkpoint directories. Drop step.")


def _open_source(
    path: os.PathLike | str,
    step: int | str | None,
    rename: RenameSpec,
    best_metric: str | None,
    best_mode: str,
    tree: str = PARAMS_KEY,
) -> tuple[dict[str, Any], _Reader, tuple[StructureRule, ...], str | None]:
    """The source's `tree` (params) as `{path: abstract or lazy leaf}` (nothing read), their reader,
    the structural rules the source itself needs (an HF folder's fused tensors), and the tree read
    (None for a weights file, an HF folder or a params-only Orbax tree).

    The reader takes `{source path: sharding or None}` and returns those arrays. A zoo entry
    published with `ema` stands for its averaged weights when `tree` is left at "params".
    """
    if tree == PARAMS_KEY:
        tree = zoo.published_tree(path)
    if hf.is_hf(path):
        _one_weights_set(path, step, "an HF folder")
        if tree != PARAMS_KEY:
            raise ValueError(f"tree={tree!r} applies to jaxckpt steps; {path} holds parameters only.")
        if rename:
            raise ValueError(f"rename= does not apply to {path}: its config.json picks the family "
                             "table that names every tensor. Drop rename; move subtrees with mapping=.")
        opened = hf.open_hf(path)
        leaves = opened.leaves
        return leaves, lambda wanted: {p: np.asarray(leaves[p]) for p in wanted}, opened.structure, None
    ref = zoo.resolve(path)
    if is_foreign(ref):
        refuse_url(ref, "weights files (.safetensors, .pt, .pth, .bin) are read from a local disk")
        if not ref.exists():
            raise CheckpointNotFoundError(f"Weights file {ref} does not exist.")
        _one_weights_set(ref, step, "a weights file")
        leaves = read_foreign(ref, rename=rename)
        return leaves, lambda wanted: {p: np.asarray(leaves[p]) for p in wanted}, (), None
    if rename:
        raise ValueError(
            f"rename= maps the tensor names of .safetensors/.pt/.pth/.bin files to tree paths, but {path} "
            "is an Orbax checkpoint, whose names are tree paths already. Drop rename, and move subtrees "
            "with mapping={'source_prefix': 'target_prefix'} instead.")
    if not _is_state_item(ref) and _is_orbax_tree(ref):
        _one_weights_set(ref, step, "a bare Orbax PyTree checkpoint")
        checkpoint = ref
    else:
        checkpoint = resolve_step_dir(ref, step, best_metric=best_metric, best_mode=best_mode)
    saved = _read_metadata(checkpoint)
    # jaxckpt steps hold the whole train state; a params-only tree is used as it is.
    prefix = tree + "/" if tree != PARAMS_KEY or any(p.startswith(PARAMS_KEY + "/") for p in saved) else ""
    if prefix and not any(p.startswith(prefix) for p in saved):
        raise CheckpointNotFoundError(
            f"{checkpoint} holds no {tree!r} tree (it has {sorted({p.split('/', 1)[0] for p in saved})})."
            + (" Averaged weights exist only in runs trained with train.ema_decay > 0: set eval.use_ema=False "
               "(or drop --ema) to read its params." if tree == zoo.EMA_TREE else ""))
    leaves = {p[len(prefix) :]: sds for p, sds in saved.items() if p.startswith(prefix)}

    def read(wanted: Mapping[str, Any]) -> dict[str, Any]:
        arrays = _read_arrays(checkpoint, {prefix + p: (leaves[p], sharding) for p, sharding in wanted.items()})
        return {p[len(prefix) :]: a for p, a in arrays.items()}

    return leaves, read, (), tree if prefix else None


def load_params(
    path: os.PathLike | str,
    target_params: Params,
    *,
    mapping: Mapping[str, str] | None = None,
    skip: Sequence[str] = (),
    strict: bool = True,
    step: int | str | None = None,
    adapters: Mapping[str, Any] | None = None,
    best_metric: str | None = None,
    best_mode: str = "min",
    rename: RenameSpec = None,
    tree: str = PARAMS_KEY,
    structure: Sequence[StructureRule] = (),
) -> tuple[Params, GraftReport]:
    r"""Grafts a checkpoint's or weights file's params into `target_params`, reading only what it loads.

    Accepts every source the loop's `checkpoint.pretrained` accepts, so the Python API and the config
    load the same things the same way.

    Args:
      path: where the weights are:
        * a jaxckpt run directory, checkpoint directory, step directory, a step's `state/` item or
          `zoo:NAME` (see `resolve_checkpoint_path`); their `params` subtree is the source;
        * a bare Orbax PyTree checkpoint directory (holding `_METADATA`/`manifest.ocdbt`, no
          `state/`), e.g. written by `ocp.StandardCheckpointer().save(path, params)`; the whole tree
          is the source unless it has a top-level `params`;
        * a `.safetensors` file or a PyTorch state dict (`.pt`/`.pth`/`.bin`, needs torch), read
          through `jaxckpt.read_foreign` (names via `rename`);
        * `hf:DIR`, a Hugging Face folder as `save_pretrained` writes it (`config.json` and single
          or sharded safetensors, or `pytorch_model.bin` with torch): its config picks the family's
          rename/layout table (`jaxckpt.weights.hf_presets`), fused tensors are split by the
          graft's `Split` rules, and the report names the rule that made each such leaf.
      target_params: the new model's params: fresh arrays (unloaded leaves keep them), or
        `jax.ShapeDtypeStruct`s (loaded leaves come back as `jax.Array`s on their shardings, or
        on the default device when they have none; the others stay abstract for the caller to
        initialise). Leaves an adapter reshapes must be arrays.
      mapping: source prefix -> target prefix, as for `graft` (None: the whole tree onto itself).
      skip: regexes of target paths to keep fresh.
      strict: raise (before reading any array) if a leaf is missing, mismatched or unused.
      step: None/"latest", "best" (with `best_metric`) or a step number; only None/"latest" for a
        bare Orbax checkpoint or a weights file, which hold one set of weights.
      adapters: shape adapters, as for `graft`.
      best_metric: the metric ranking steps for `step="best"`.
      best_mode: "min" or "max" for `step="best"`.
      rename: for weights files only: rules mapping tensor names to tree paths (see
        `jaxckpt.weights.foreign.rename_rules`), e.g. `{r"bert\.(.*)": r"encoder/\1"}`.
      tree: which top-level subtree of a jaxckpt step is the source: "params" (default), or another
        field of the saved `TrainState` such as "model_state" (batch statistics).
      structure: structural rules (`Split`, `Fuse`, `Stack`, `Unstack`) applied to the source's
        params first, as for `graft`; only the source leaves the loaded ones are made from are read.

    Returns:
      `(params, report)`: params shaped like `target_params`, and the `GraftReport`.

    Raises:
      CheckpointNotFoundError: if the path, file or step does not exist or holds no checkpoint.
      CheckpointCorruptError: if the metadata or the needed arrays are proven damaged.
      CheckpointReadError: if they cannot be read for another reason (EMFILE, EIO, ...).
      CheckpointFormatError: if a newer jaxckpt wrote the step.
      ImportError: for a PyTorch file without torch installed.
      ValueError: in strict mode, one error listing every problem leaf; for rules matching nothing;
        for an adapter onto an abstract target leaf; for `step` with a single set of weights; for
        `rename` with an Orbax checkpoint. All are raised before any array is read.

    Example:
      >>> params, report = load_params("runs/pretrain", fresh_params, mapping={"encoder": "encoder"},
      ...                              strict=False)
      >>> params, report = load_params("bert.safetensors", fresh_params, rename={r"bert\.(.*)": r"encoder/\1"},
      ...                              strict=False)
      >>> print(report)
    """
    raw, read, own_structure, source_tree = _open_source(path, step, rename, best_metric, best_mode, tree)
    structure = own_structure + tuple(structure)
    source = restructure(raw, structure) if structure else raw
    report = plan(source, target_params, mapping=mapping, skip=skip, adapters=adapters)
    if strict:
        report.check()
    targets = treepath.flatten(target_params)
    _check_no_abstract_adapted(report, targets)
    wanted = {}
    for entry in report.loaded + report.adapted:
        leaf = source[entry.source]
        if isinstance(leaf, Derived):  # Read what it is made from; it is cut or joined on the host.
            wanted.update((p, None) for p in leaf.inputs)
            continue
        same_shape = tuple(leaf.shape) == tuple(np.shape(targets[entry.path]))
        wanted[entry.source] = _sharding_of(targets[entry.path]) if same_shape else None
    raw.update(read(wanted))
    source = restructure(raw, structure) if structure else raw
    params, report = graft(source, target_params, mapping=mapping, skip=skip, strict=strict, adapters=adapters)
    abstract_loaded = [e for e in report.loaded if isinstance(targets[e.path], jax.ShapeDtypeStruct)]
    if abstract_loaded:
        # graft leaves abstract targets abstract; hand back what was read as arrays in the target's
        # dtype, on its sharding (or the default device when it has none).
        flat = treepath.flatten(params)
        for entry in abstract_loaded:
            target, leaf = targets[entry.path], source[entry.source]
            value = leaf() if isinstance(leaf, Derived) else leaf
            if isinstance(value, jax.Array) and not value.is_fully_addressable:
                # Read onto the target's sharding across processes: no process may fetch it whole.
                flat[entry.path] = value if value.dtype == target.dtype else value.astype(target.dtype)
                continue
            flat[entry.path] = jax.device_put(np.asarray(value).astype(target.dtype), _sharding_of(target))
        params = treepath.unflatten(flat, target_params)
    return params, dataclasses.replace(report, source_tree=source_tree)


def _check_no_abstract_adapted(report: GraftReport, targets: Mapping[str, Any]) -> None:
    """Refuses adapters onto abstract targets: an adapter may fill from the fresh value they lack."""
    abstract = [e.path for e in report.adapted if isinstance(targets[e.path], jax.ShapeDtypeStruct)]
    if abstract:
        raise ValueError(
            f"adapters reshape {abstract}, but their target leaves are jax.ShapeDtypeStructs: an adapter "
            "fills what the source does not cover from the target's freshly initialised value (resize "
            "keeps it outside the copied block; a callable receives it), which an abstract leaf does "
            "not have. Pass initialised arrays for these leaves in target_params, or drop the adapter "
            "rule for them (they are then reported mismatched and stay abstract)."
        )
