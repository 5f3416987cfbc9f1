"""The digits with a tiny Hugging Face ViT; the offline `hf:` demo (README, "Hugging Face models").

Train it, export it as an HF folder, and finetune from that folder onto parity with a fresh head:

  python experiments/run.py --config experiments/configs/vit_digits.py --workdir runs/hf/vit_digits
  python -m jaxckpt export runs/hf/vit_digits --format hf runs/hf/vit_digits_hf
  python experiments/run.py --config experiments/configs/vit_digits.py --workdir runs/hf/vit_parity --config.data.target=parity --config.checkpoint.pretrained=hf:runs/hf/vit_digits_hf --config.checkpoint.mapping=vit:vit
"""

import ml_collections

from experiments.configs import digits


def get_config() -> ml_collections.ConfigDict:
    config = digits.get_config()
    config.task = "experiments.tasks.hf_vision"  # module defining build(config) -> jaxckpt.Task
    config.train.num_steps = 400  # optimizer updates in total
    config.train.eval_every_steps = 100  # validate every N steps
    config.checkpoint.every_steps = 100  # save every N steps
    config.model = ml_collections.ConfigDict()
    config.model.hf_config = ""  # HF config.json or folder; "" = checkpoint.pretrained's if hf:, else a tiny ViT
    return config
