#!/usr/bin/env bash
# Runs every step of the README's EIR, MMF and finetuning tutorials on the offline digits data and
# copies each EIR/MMF run's curves.png into docs/figures/. The PyTorch steps run only where torch is
# installed. Usage (from the repository root, after the README set-up):
#   bash experiments/tutorials.sh            # about 2 minutes on 2 CPU cores (measured 118 s without torch)
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
RUN="$PY experiments/run.py --config experiments/configs/digits.py"
export JAXCKPT_ZOO=${JAXCKPT_ZOO:-runs/zoo}
rm -rf runs/eir runs/mmf runs/ft runs/hf "$JAXCKPT_ZOO"
step() { echo; echo "\$ $*"; "$@" 2>&1 | grep -vE ' step [0-9]+/' | tail -n 12; echo "(exit ${PIPESTATUS[0]})"; }

# EIR: scratch -> continue from it -> change the fusion layer (strict fails, non-strict loads the rest)
step $RUN --workdir runs/eir/1_scratch
step $RUN --workdir runs/eir/2_continued --config.checkpoint.pretrained=runs/eir/1_scratch
step $RUN --workdir runs/eir/3_fusion --config.checkpoint.pretrained=runs/eir/1_scratch --config.model.fusion_dims='(128,)'
step $RUN --workdir runs/eir/3_fusion --config.checkpoint.pretrained=runs/eir/1_scratch --config.model.fusion_dims='(128,)' --config.checkpoint.strict=False

# MMF: publish to the zoo -> finetune onto parity with a mapping -> resume -> resume_best -> val/test/predict
step $PY -m jaxckpt zoo publish runs/eir/1_scratch digits.mlp --best
step $PY -m jaxckpt plan zoo:digits.mlp --config experiments/configs/digits.py --config.data.target=parity --config.checkpoint.mapping=encoder:encoder
step $RUN --workdir runs/mmf/parity --config.data.target=parity --config.checkpoint.pretrained=zoo:digits.mlp --config.checkpoint.mapping=encoder:encoder --config.train.num_steps=400 --config.checkpoint.max_to_keep=-1 --config.early_stop.criteria=val/accuracy --config.early_stop.minimize=False
step $RUN --workdir runs/mmf/parity --config.data.target=parity --config.checkpoint.pretrained=zoo:digits.mlp --config.checkpoint.mapping=encoder:encoder --config.train.num_steps=600 --config.checkpoint.max_to_keep=-1 --config.early_stop.criteria=val/accuracy --config.early_stop.minimize=False
step $RUN --workdir runs/mmf/parity --config.data.target=parity --config.checkpoint.resume_best=True --config.train.num_steps=800 --config.checkpoint.max_to_keep=-1 --config.early_stop.criteria=val/accuracy --config.early_stop.minimize=False
step $RUN --workdir runs/mmf/parity_eval --config.data.target=parity --config.run_type=val --config.checkpoint.resume_file=runs/mmf/parity
step $RUN --workdir runs/mmf/parity_eval --config.data.target=parity --config.run_type=test --config.checkpoint.resume_file=runs/mmf/parity
step $RUN --workdir runs/mmf/parity_eval --config.data.target=parity --config.run_type=predict --config.checkpoint.resume_file=runs/mmf/parity
step $PY -m jaxckpt inspect runs/mmf/parity

# Finetuning: freeze the encoder -> lr multipliers -> resize the parity head to 10 digits -> safetensors out and back in
step $PY -m jaxckpt plan runs/eir/1_scratch --config experiments/configs/digits.py --config.optimizer.freeze=encoder
step $RUN --workdir runs/ft/frozen --config.checkpoint.pretrained=runs/eir/1_scratch --config.optimizer.freeze=encoder
step $PY -m jaxckpt inspect runs/ft/frozen
step $RUN --workdir runs/ft/lr --config.checkpoint.pretrained=runs/eir/1_scratch --config.optimizer.lr_multipliers=encoder:0.1,head:10
step $RUN --workdir runs/ft/bad_rules --config.checkpoint.pretrained=runs/eir/1_scratch --config.optimizer.freeze=encoder --config.optimizer.lr_multipliers=encoder:0.1
step $RUN --workdir runs/ft/digits_from_parity --config.checkpoint.pretrained=runs/mmf/parity --config.checkpoint.adapters=head:resize
step $PY -m jaxckpt export runs/eir/1_scratch runs/ft/digits.safetensors
step $PY -m jaxckpt plan runs/ft/digits.safetensors --config experiments/configs/digits.py
step $RUN --workdir runs/ft/from_safetensors --config.checkpoint.pretrained=runs/ft/digits.safetensors

# PyTorch: a state dict of an nn.Sequential MLP with the digits model's shapes, renamed onto the Flax paths
RENAME='0\.weight=>encoder/Dense_0/kernel;0\.bias=>encoder/Dense_0/bias;2\.weight=>fusion/Dense_0/kernel;2\.bias=>fusion/Dense_0/bias;4\.weight=>head/kernel;4\.bias=>head/bias'
if $PY -c 'import torch' 2>/dev/null; then
  step $PY -c "import torch; torch.manual_seed(0); torch.save(torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10)).state_dict(), 'runs/ft/mlp.pt')"
  step $PY -m jaxckpt plan runs/ft/mlp.pt --config experiments/configs/digits.py --config.checkpoint.rename="$RENAME"
  step $RUN --workdir runs/ft/from_pytorch --config.checkpoint.pretrained=runs/ft/mlp.pt --config.checkpoint.rename="$RENAME"
else
  echo; echo "(torch is not installed: skipping the PyTorch steps; pip install torch to run them)"
fi

# Hugging Face: inspect a fixture folder; train a tiny ViT, export it as an HF folder, finetune from it onto parity
VIT="$PY experiments/run.py --config experiments/configs/vit_digits.py"
step $PY -m jaxckpt inspect hf:tests/fixtures/hf/gpt2_lm_head
step $VIT --workdir runs/hf/vit_digits
step $PY -m jaxckpt export runs/hf/vit_digits --format hf runs/hf/vit_digits_hf
step $PY -m jaxckpt inspect hf:runs/hf/vit_digits_hf
step $PY -m jaxckpt plan hf:runs/hf/vit_digits_hf --config experiments/configs/vit_digits.py --config.data.target=parity --config.checkpoint.mapping=vit:vit
step $VIT --workdir runs/hf/vit_parity --config.data.target=parity --config.checkpoint.pretrained=hf:runs/hf/vit_digits_hf --config.checkpoint.mapping=vit:vit
step $PY -m jaxckpt plan --config experiments/configs/bert_imdb.py

for run in eir/1_scratch eir/2_continued eir/3_fusion mmf/parity; do
  [ -f "runs/$run/curves.png" ] && cp "runs/$run/curves.png" "docs/figures/$(echo "$run" | tr / _).png"
done
echo; echo "figures: $(ls docs/figures)"
