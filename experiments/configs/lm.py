"""Offline language model: a byte-level transformer trained on the Python standard library's sources.

Run it (about 7 minutes on 2 busy CPU cores: 1000 steps at ~0.4 s, loss 6.0 at the
start, val loss 1.26 nats/byte at the end):

  python experiments/run.py --config experiments/configs/lm.py --workdir runs/lm

Grow it to 4 layers, taking embed, blocks_0/1, final_norm and head from that run (blocks_2/3 fresh):

  python experiments/run.py --config experiments/configs/lm.py --workdir runs/lm4 \
      --config.model.num_layers=4 --config.checkpoint.pretrained=runs/lm --config.checkpoint.strict=False
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.task = "experiments.tasks.lm"  # module defining build(config) -> jaxckpt.Task
    config.run_type = "train_val"  # train_val | train | val | test | predict
    config.seed = 0  # seeds init, dropout and data order

    config.train = ml_collections.ConfigDict()
    config.train.num_steps = 1000  # optimizer updates in total (a resumed run continues to this)
    config.train.batch_size = 32  # global batch size, split over all devices
    config.train.grad_accum_steps = 1  # micro-batches per update (must divide batch_size)
    config.train.eval_every_steps = 250  # validate every N steps (train_val only)
    config.train.log_every_steps = 50  # write averaged train metrics every N steps

    config.eval = ml_collections.ConfigDict()
    config.eval.batch_size = 128  # eval/predict batch size (last batch padded and masked)

    config.optimizer = ml_collections.ConfigDict()
    config.optimizer.name = "adamw"  # adam | adamw | sgd | momentum
    config.optimizer.learning_rate = 2e-3  # peak learning rate
    config.optimizer.schedule = "warmup_cosine"  # constant | cosine | warmup_cosine
    config.optimizer.warmup_steps = 100  # linear warm-up steps (warmup_cosine)
    config.optimizer.decay_steps = 0  # cosine decay length; 0 = train.num_steps
    config.optimizer.weight_decay = 0.01  # decoupled weight decay (adamw)
    config.optimizer.grad_clip_norm = 1.0  # clip gradients to this global norm; 0 = off
    config.optimizer.freeze = ""  # comma-separated regexes of param paths kept frozen
    config.optimizer.lr_multipliers = ""  # "regex:mult,..." per-path learning-rate multipliers

    config.model = ml_collections.ConfigDict()
    config.model.num_layers = 2  # transformer blocks, named blocks_0 ... blocks_{n-1}
    config.model.num_heads = 4  # attention heads (must divide d_model)
    config.model.d_model = 128  # residual width
    config.model.d_ff = 512  # hidden width of each block's MLP
    config.model.seq_len = 128  # bytes per example (and positional embeddings)
    config.model.dropout = 0.0  # dropout after attention and MLP (the corpus is not repeated much)

    config.data = ml_collections.ConfigDict()
    config.data.source_dir = ""  # folder of .py files; "" = this interpreter's standard library
    config.data.corpus_mb = 8.0  # read the first N MB (1e6 bytes) of the sorted .py files
    config.data.val_fraction = 0.05  # share of files (by hash of path) in the val split
    config.data.test_fraction = 0.05  # share of files (by hash of path) in the test split

    config.predict = ml_collections.ConfigDict()
    config.predict.prompt_len = 32  # bytes of each eval window given as the prompt (prompt + sample <= seq_len)
    config.predict.sample_len = 32  # bytes generated, each by a full pass over prompt + sample (no KV cache)
    config.predict.temperature = 0.0  # sampling temperature; 0 = greedy
    config.predict.seed = 0  # sampling seed (folded with each example id)

    config.checkpoint = ml_collections.ConfigDict()
    config.checkpoint.every_steps = 250  # save every N steps (and at the end, and at a new best)
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
    return config
