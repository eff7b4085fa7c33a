#!/usr/bin/env bash
# LEGION localization + explanation training with the paper's settings.
#   bash train_loc_exp.sh [key=value ...]                                   # 1 process (GPU or CPU)
#   LAUNCHER="deepspeed --num_gpus 8" bash train_loc_exp.sh [key=value ...]  # DeepSpeed launcher
#   LAUNCHER="deepspeed --hostfile hostfile" bash train_loc_exp.sh ...       # several nodes
#   LAUNCHER="torchrun --nproc_per_node 8" bash train_loc_exp.sh ...
#   CONFIG=configs/tiny/train_loc_exp.yaml bash train_loc_exp.sh ...          # the tiny CPU run
# e.g. bash train_loc_exp.sh model.path=checkpoints/GLaMM-GranD-Pretrained data.root=data/SynthScars
# Relative paths (key=value, CONFIG, the config's data/model paths) are taken from the current directory.
set -euo pipefail
REPO="$(cd "$(dirname "$0")" && pwd)"
CONFIG="${CONFIG:-$REPO/configs/legion_7b/train_loc_exp.yaml}"
PYTHON="${PYTHON:-$( [ -x "$REPO/.venv/bin/python" ] && echo "$REPO/.venv/bin/python" || echo python )}"
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
LAUNCHER="${LAUNCHER:-$PYTHON}"
case "$LAUNCHER" in
  *deepspeed*) exec $LAUNCHER --no_local_rank --module legion.cli train --config "$CONFIG" "$@" ;;
  *)          exec $LAUNCHER -m legion.cli train --config "$CONFIG" "$@" ;;
esac
