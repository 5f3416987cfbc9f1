"""Offline language model: a byte-level transformer trained on the Python standard library's sources.

Pretrain it (a few minutes on 2 CPU cores; val loss falls from 5.5 to about 1.4 nats/byte):

  .venv/bin/python experiments/run.py --config experiments/configs/lm.py --workdir runs/lm

Grow it to 4 layers, taking embed, pos_embed, blocks_0/1, final_norm and head from that run
(blocks_2/3 start fresh; the graft report says so), and train on:

  .venv/bin/python experiments/run.py --config experiments/configs/lm.py --workdir runs/lm4 \
      --config.model.num_layers=4 --config.checkpoint.pretrained=runs/lm --config.checkpoint.strict=False

Generated samples (greedy continuations of the first bytes of test windows) as predictions:

  .venv/bin/python experiments/run.py --config experiments/configs/lm.py --workdir runs/lm4 \
      --config.model.num_layers=4 --config.run_type=predict
"""

import ml_collections

import jaxckpt


def get_config() -> ml_collections.ConfigDict:
    config = jaxckpt.default_config()  # every other key keeps its documented default
    config.task = "experiments.tasks.lm"  # module defining build(config) -> jaxckpt.Task

    config.train.num_steps = 600  # optimizer updates in total (a resumed run continues to this)
    config.train.batch_size = 32  # global batch size, split over all devices
    config.train.eval_every_steps = 200  # validate every N steps (train_val only)
    config.train.log_every_steps = 50  # write averaged train metrics every N steps
    config.eval.batch_size = 128  # eval/predict batch size (last batch padded and masked)
    config.checkpoint.every_steps = 200  # save every N steps (and at the end, and at a new best)

    config.optimizer.name = "adamw"  # decoupled weight decay on kernels and embeddings
    config.optimizer.learning_rate = 2e-3  # peak learning rate
    config.optimizer.schedule = "warmup_cosine"  # linear warm-up, then cosine decay to 0
    config.optimizer.warmup_steps = 100  # linear warm-up steps
    config.optimizer.weight_decay = 0.01  # decoupled weight decay (adamw)
    config.optimizer.grad_clip_norm = 1.0  # clip gradients to this global norm

    config.model.num_layers = 2  # transformer blocks, named blocks_0 ... blocks_{n-1}
    config.model.num_heads = 4  # attention heads (must divide d_model)
    config.model.d_model = 128  # residual width
    config.model.d_ff = 512  # hidden width of each block's MLP
    config.model.seq_len = 128  # bytes per example (and positional embeddings)
    config.model.dropout = 0.0  # dropout after attention and MLP (the corpus is not repeated much)

    config.data.source_dir = ""  # folder of .py files; "" = this interpreter's standard library
    config.data.corpus_mb = 8.0  # read the first N MB (1e6 bytes) of the sorted .py files
    config.data.val_fraction = 0.05  # share of files (by hash of path) in the val split
    config.data.test_fraction = 0.05  # share of files (by hash of path) in the test split

    config.predict.max_examples = 256  # each sample costs sample_len full passes (no KV cache)
    config.predict.prompt_len = 32  # bytes of each test window given as the prompt (prompt + sample <= seq_len)
    config.predict.sample_len = 32  # bytes generated after the prompt
    config.predict.temperature = 0.0  # sampling temperature; 0 = greedy
    config.predict.seed = 0  # sampling seed (folded with each example id)
    return config
