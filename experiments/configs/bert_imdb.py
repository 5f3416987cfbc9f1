"""Finetune a BERT-family Hugging Face encoder on IMDB (tfds `imdb_reviews`) with a fresh head.

`checkpoint.pretrained` is an HF folder (as `save_pretrained` writes it; here the tiny random BERT
committed for the tests); its `config.json` builds the model, and `checkpoint.mapping=':bert'`
grafts the folder's `BertModel` weights under `bert/`, leaving the `classifier` head fresh. See
what would load (offline: planning prepares no dataset), then train (the first run downloads IMDB,
about 80 MB):

  python -m jaxckpt plan --config experiments/configs/bert_imdb.py
  python experiments/run.py --config experiments/configs/bert_imdb.py --workdir runs/bert_imdb

For a real BERT, point `checkpoint.pretrained` at its folder and raise `data.max_length` (up to
its `max_position_embeddings`); a folder of `BertForSequenceClassification` takes
`checkpoint.mapping=bert:bert`.
"""

import ml_collections

from experiments.configs import imdb


def get_config() -> ml_collections.ConfigDict:
    config = imdb.get_config()
    config.task = "experiments.tasks.hf_text"  # module defining build(config) -> jaxckpt.Task
    config.train.num_steps = 1000  # optimizer updates in total
    config.optimizer.learning_rate = 5e-5  # peak learning rate (BERT finetuning scale)
    config.optimizer.schedule = "warmup_cosine"  # linear warm-up, then cosine decay
    config.optimizer.warmup_steps = 100  # warm-up steps
    config.data.max_length = 16  # tokens per review ([CLS] + words), at most max_position_embeddings
    config.model = ml_collections.ConfigDict()
    config.model.hf_config = ""  # HF config.json or folder of the model; "" = checkpoint.pretrained's
    config.checkpoint.pretrained = "hf:tests/fixtures/hf/bert"  # HF folder of the encoder
    config.checkpoint.mapping = ":bert"  # the folder's BertModel weights go under bert/; classifier fresh
    return config
