"""Offline default: classify the UCI handwritten digits shipped inside scikit-learn.

Run it (about a minute on 2 CPU cores):

  python experiments/run.py --config experiments/configs/digits.py --workdir runs/digits

Any field can be overridden, e.g. `--config.model.fusion_dims='(128, 64)'` or
`--config.checkpoint.pretrained=runs/digits --config.checkpoint.strict=False`.
"""

import ml_collections

import jaxckpt


def get_config() -> ml_collections.ConfigDict:
    config = jaxckpt.default_config()  # every other key keeps its documented default
    config.task = "experiments.tasks.digits"  # module defining build(config) -> jaxckpt.Task

    config.train.num_steps = 600  # optimizer updates in total (a resumed run continues to this)

    config.model.encoder_dims = (128,)  # encoder MLP widths
    config.model.fusion_dims = (64,)  # fusion MLP widths (the layer EIR changes when finetuning)
    config.model.dropout = 0.1  # dropout rate in the fusion MLP

    config.data.target = "digit"  # digit (10 classes) | parity (2 classes: even/odd)
    config.data.data_dir = ""  # where tfds prepares data; "" = $JAXCKPT_DATA_DIR or ~/.cache/jaxckpt/tfds
    config.data.val_fraction = 0.15  # fraction of the training part held out as the val split
    return config
