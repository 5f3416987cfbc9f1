"""The runner's configuration: `default_config()` and completing a user's config from it.

Experiment configs start from `default_config()` and change a few fields; the task-specific
sections `model` and `data` start empty and are the experiment's own. A config written without
some section (or an older config without a newer key) is completed from the defaults by
`complete`, so the loop never meets an `AttributeError` for a missing field.
"""

from __future__ import annotations

from typing import Any

from jaxckpt.errors import UserError

# Sections every run reads; `model` and `data` belong to the task and have no defaults.
SECTIONS = ("train", "eval", "optimizer", "checkpoint", "early_stop", "predict", "mesh")


def default_config() -> Any:
    """The complete default configuration of a run, every field with a one-line comment.

    Returns:
      An unlocked `ml_collections.ConfigDict`. Set `task` (an import path) unless you pass `task=`
      to `jaxckpt.run`, and fill `model`/`data` with what your task reads.

    Example:
      >>> config = default_config()
      >>> config.task = "experiments.tasks.digits"
      >>> config.train.num_steps = 300
    """
    ml_collections = _ml_collections()
    c = ml_collections.ConfigDict()
    c.task = ""  # module defining build(config, artifacts=None) -> Task; "" when jaxckpt.run(task=...) gets one
    c.run_type = "train_val"  # train_val | train | val | test | predict
    c.seed = 0  # seeds init, dropout and data order

    c.train = ml_collections.ConfigDict()
    c.train.num_steps = 1000  # optimizer updates in total (a resumed run continues to this)
    c.train.batch_size = 64  # global batch size, split over all devices
    c.train.grad_accum_steps = 1  # micro-batches per update (must divide batch_size)
    c.train.eval_every_steps = 100  # validate every N steps (train_val only)
    c.train.log_every_steps = 20  # write averaged train metrics every N steps
    c.train.prefetch = 2  # batches prepared ahead on a background thread; 0 = on the main thread
    c.train.ema_decay = 0.0  # keep an exponential moving average of the params with this decay; 0 = off

    c.eval = ml_collections.ConfigDict()
    c.eval.batch_size = 256  # eval/predict batch size (last batch padded and masked)
    c.eval.split = ""  # split that run_type=val/test/predict use; "" = val, test, test
    c.eval.use_ema = False  # validation, val/test/predict and pretrained read the averaged params (train.ema_decay)

    c.predict = ml_collections.ConfigDict()
    c.predict.max_examples = 0  # predict at most this many examples of the split; 0 = all

    c.optimizer = ml_collections.ConfigDict()
    c.optimizer.name = "adam"  # adam | adamw | sgd | momentum (ignored when jaxckpt.run gets tx=)
    c.optimizer.learning_rate = 1e-3  # peak learning rate
    c.optimizer.schedule = "constant"  # constant | cosine | warmup_cosine
    c.optimizer.warmup_steps = 0  # linear warm-up steps (warmup_cosine)
    c.optimizer.decay_steps = 0  # cosine decay length; 0 = train.num_steps
    c.optimizer.weight_decay = 0.0  # decoupled weight decay (adamw)
    c.optimizer.grad_clip_norm = 0.0  # clip gradients to this global norm; 0 = off
    c.optimizer.freeze = ""  # comma-separated regexes of param paths kept frozen
    c.optimizer.lr_multipliers = ""  # "regex:mult,..." per-path learning-rate multipliers

    c.model = ml_collections.ConfigDict()  # the task's model fields (no defaults)
    c.data = ml_collections.ConfigDict()  # the task's data fields (no defaults)

    c.checkpoint = ml_collections.ConfigDict()
    c.checkpoint.every_steps = 100  # save every N steps (and at the end, and at a new best)
    c.checkpoint.every_seconds = 0.0  # also save once this much wall time passed since the last save; 0 = off
    c.checkpoint.max_to_keep = 3  # keep the latest N checkpoints; -1 keeps all
    c.checkpoint.keep_best = 1  # also keep the best K by early_stop.criteria
    c.checkpoint.keep_every_steps = 0  # also keep every N-th step forever; 0 = off
    c.checkpoint.async_save = True  # write checkpoints in the background
    c.checkpoint.lock_lease_s = 60.0  # gs:// / s3:// workdirs: a killed run's lock is taken over this long after its last renewal
    c.checkpoint.resume = True  # continue from this workdir's own checkpoint if it has one
    c.checkpoint.resume_best = False  # use the best rather than the latest checkpoint
    c.checkpoint.resume_file = ""  # run dir, step dir or zoo:NAME: full state to continue from / evaluate
    c.checkpoint.pretrained = ""  # run dir, step dir, zoo:NAME, .safetensors, .pt or hf:DIR: weights-only init
    c.checkpoint.strict = True  # pretrained: every target leaf must load (False: load what matches)
    c.checkpoint.mapping = ""  # pretrained: "src:dst,..." path-prefix rules; "" = whole tree
    c.checkpoint.skip = ""  # pretrained: comma-separated regexes of target paths kept fresh
    c.checkpoint.adapters = ""  # pretrained: "regex:resize|interpolate,..." opt-in shape adapters
    c.checkpoint.rename = ""  # pretrained .safetensors/.pt: "regex=>path;..." key renames
    c.checkpoint.structure = ""  # pretrained: "split SRC => DST1, DST2 @ AXIS; stack L_{i} => STACKED; ..." rules

    c.early_stop = ml_collections.ConfigDict()
    c.early_stop.criteria = "val/loss"  # metric that picks the best checkpoint and stops early
    c.early_stop.minimize = True  # whether lower criteria is better
    c.early_stop.patience = -1  # evaluations without improvement before stopping; -1 = off

    c.mesh = ml_collections.ConfigDict()
    c.mesh.data = -1  # data-parallel axis size; -1 = the devices mesh.fsdp leaves (data x fsdp = all devices)
    c.mesh.fsdp = 1  # axis params and optimizer state are sharded along; 1 = replicated (pure data parallel)
    c.mesh.rules = ""  # "regex=spec;..." e.g. "encoder/.*kernel=fsdp,None"; "" = largest dim fsdp divides
    return c


def complete(config: Any) -> Any:
    """`config` with every section and field of `default_config()` it lacks added, its own values kept.

    Args:
      config: an `ml_collections.ConfigDict` (locked or not) or a plain nested dict.

    Returns:
      A new ConfigDict, locked when `config` was (so a misspelt key still fails loudly).

    Raises:
      UserError: if a section that must be a group of fields (e.g. `train`) is something else.
    """
    ml_collections = _ml_collections()
    locked = isinstance(config, ml_collections.ConfigDict) and config.is_locked
    given = config.to_dict() if isinstance(config, ml_collections.ConfigDict) else dict(config)
    merged = default_config().to_dict()
    for key, value in given.items():
        default = merged.get(key)
        if isinstance(default, dict):
            if not isinstance(value, dict):
                raise UserError(f"config.{key} must be a group of fields (like default_config().{key}), "
                                f"got {type(value).__name__} {value!r}.")
            merged[key] = {**default, **value}
        else:
            merged[key] = value
    out = ml_collections.ConfigDict(merged)
    if locked:
        out.lock()
    return out


def _ml_collections() -> Any:
    try:
        import ml_collections
    except ImportError as e:
        from jaxckpt.errors import MissingDependencyError

        raise MissingDependencyError(
            "the config-driven runner needs ml-collections: pip install 'jaxckpt[runner]'.") from e
    return ml_collections
