"""Offline default: classify the UCI handwritten digits shipped inside scikit-learn.

Run it (about a minute on 2 CPU cores):

  python experiments/run.py --config experiments/configs/digits.py --workdir runs/digits

Any field can be overridden, e.g. `--config.model.fusion_dims='(128, 64)'` or
`--config.checkpoint.pretrained=runs/digits --config.checkpoint.strict=False`.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.task = "experiments.tasks.digits"  # module defining build(config) -> jaxckpt.Task
    config.run_type = "train_val"  # train_val | train | val | test | predict
    config.seed = 0  # seeds init, dropout and data order

    config.train = ml_collections.ConfigDict()
    config.train.num_steps = 600  # optimizer updates in total (a resumed run continues to this)
    config.train.batch_size = 64  # global batch size, split over all devices
    config.train.grad_accum_steps = 1  # micro-batches per update (must divide batch_size)
    config.train.eval_every_steps = 100  # validate every N steps (train_val only)
    config.train.log_every_steps = 20  # write averaged train metrics every N steps

    config.eval = ml_collections.ConfigDict()
    config.eval.batch_size = 256  # eval/predict batch size (last batch padded and masked)

    config.optimizer = ml_collections.ConfigDict()
    config.optimizer.name = "adam"  # adam | adamw | sgd | momentum
    config.optimizer.learning_rate = 1e-3  # peak learning rate
    config.optimizer.schedule = "constant"  # constant | cosine | warmup_cosine
    config.optimizer.warmup_steps = 0  # linear warm-up steps (warmup_cosine)
    config.optimizer.decay_steps = 0  # cosine decay length; 0 = train.num_steps
    config.optimizer.weight_decay = 0.0  # decoupled weight decay (adamw)
    config.optimizer.grad_clip_norm = 0.0  # clip gradients to this global norm; 0 = off
    config.optimizer.freeze = ""  # comma-separated regexes of param paths kept frozen
    config.optimizer.lr_multipliers = ""  # "regex:mult,..." per-path learning-rate multipliers

    config.model = ml_collections.ConfigDict()
    config.model.encoder_dims = (128,)  # encoder MLP widths
    config.model.fusion_dims = (64,)  # fusion MLP widths (the layer EIR changes when finetuning)
    config.model.dropout = 0.1  # dropout rate in the fusion MLP

    config.data = ml_collections.ConfigDict()
    config.data.target = "digit"  # digit (10 classes) | parity (2 classes: even/odd)
    config.data.data_dir = ""  # where tfds prepares data; "" = $JAXCKPT_DATA_DIR or ~/.cache/jaxckpt/tfds
    config.data.val_fraction = 0.15  # fraction of the training part held out as the val split

    config.checkpoint = ml_collections.ConfigDict()
    config.checkpoint.every_steps = 100  # save every N steps (and at the end, and at a new best)
    config.checkpoint.max_to_keep = 3  # keep the latest N checkpoints; -1 keeps all
    config.checkpoint.keep_best = 1  # also keep the best K by early_stop.criteria
    config.checkpoint.keep_every_steps = 0  # also keep every N-th step forever; 0 = off
    config.checkpoint.async_save = True  # write checkpoints in the background
    config.checkpoint.resume = True  # continue from this workdir's own checkpoint if it has one
    config.checkpoint.resume_best = False  # use the best rather than the latest checkpoint
    config.checkpoint.resume_file = ""  # run dir, step dir or zoo:NAME: full state to continue from / evaluate
    config.checkpoint.pretrained = ""  # run dir, step dir, zoo:NAME, .safetensors or .pt: weights-only init
    config.checkpoint.strict = True  # pretrained: every target leaf must load (False: load what matches)
    config.checkpoint.mapping = ""  # pretrained: "src:dst,..." path-prefix rules; "" = whole tree
    config.checkpoint.skip = ""  # pretrained: comma-separated regexes of target paths kept fresh
    config.checkpoint.adapters = ""  # pretrained: "regex:resize|interpolate,..." opt-in shape adapters
    config.checkpoint.rename = ""  # pretrained .safetensors/.pt: "regex=>path;..." key renames

    config.early_stop = ml_collections.ConfigDict()
    config.early_stop.criteria = "val/loss"  # metric that picks the best checkpoint and stops early
    config.early_stop.minimize = True  # whether lower criteria is better
    config.early_stop.patience = -1  # evaluations without improvement before stopping; -1 = off

    config.mesh = ml_collections.ConfigDict()
    config.mesh.data = -1  # data-parallel axis size; -1 = the devices mesh.fsdp leaves
    config.mesh.fsdp = 1  # axis params and optimizer state are sharded along; 1 = replicated
    config.mesh.rules = ""  # "regex=spec;..." e.g. "Dense_0/kernel=fsdp,None"; "" = largest dim fsdp divides
    return config
