"""IMDB sentiment (tfds `imdb_reviews`): text model embedding -> encoder -> fusion -> head.

Needs the dataset once (internet); tests run it under `tfds.testing.mock_data`:

  python experiments/run.py --config experiments/configs/imdb.py --workdir runs/imdb
"""

import ml_collections

from experiments.configs import digits


def get_config() -> ml_collections.ConfigDict:
    config = digits.get_config()
    config.task = "experiments.tasks.imdb"  # module defining build(config) -> jaxckpt.Task
    config.train.num_steps = 2000  # optimizer updates in total
    config.train.batch_size = 32  # global batch size
    config.train.eval_every_steps = 250  # validate every N steps
    config.checkpoint.every_steps = 250  # save every N steps
    config.eval.batch_size = 128  # eval/predict batch size
    config.data.target = "sentiment"  # the two IMDB labels (neg, pos)
    config.data.vocab_size = 20000  # most frequent training tokens kept (plus <pad>, <unk>)
    config.data.max_length = 256  # tokens per review (truncated / padded)
    config.model.embed_dim = 64  # token embedding width
    config.model.encoder_dims = (128,)  # encoder MLP widths over the pooled embedding
    config.early_stop.criteria = "val/accuracy"  # pick the best checkpoint by validation accuracy
    config.early_stop.minimize = False  # higher accuracy is better
    return config
