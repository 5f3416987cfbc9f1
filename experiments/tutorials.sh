#!/usr/bin/env bash
# Runs every step of the README's EIR and MMF tutorials on the offline digits data and copies each
# run's curves.png into docs/figures/. Usage (from the repository root, after the README set-up):
#   bash experiments/tutorials.sh            # about 2 minutes on 2 CPU cores
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
RUN="$PY experiments/run.py --config experiments/configs/digits.py"
export JAXCKPT_ZOO=${JAXCKPT_ZOO:-runs/zoo}
rm -rf runs/eir runs/mmf "$JAXCKPT_ZOO"
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

for run in eir/1_scratch eir/2_continued eir/3_fusion mmf/parity; do
  [ -f "runs/$run/curves.png" ] && cp "runs/$run/curves.png" "docs/figures/$(echo "$run" | tr / _).png"
done
echo; echo "figures: $(ls docs/figures)"
