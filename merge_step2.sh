#!/usr/bin/env bash
# Step 2 of 2: fold the LoRA of the step-1 weights into the base model -> a model directory
# (config.json, model.safetensors, tokenizer, vision_tower/) that `legion infer` loads offline.
#   bash merge_step2.sh BASE_DIR WEIGHTS OUT_DIR [--lora-r 8 --lora-alpha 16 --dtype bfloat16 --vision-tower CLIP_DIR]
# BASE_DIR: the model training started from (e.g. checkpoints/GLaMM-GranD-Pretrained; GLaMM dirs
# need --vision-tower with a local CLIP copy). WEIGHTS: merge_step1.sh's output.
set -euo pipefail
if [ $# -lt 3 ]; then
  sed -n '2,6p' "$0"; exit 2
fi
REPO="$(cd "$(dirname "$0")" && pwd)"
PYTHON="${PYTHON:-$( [ -x "$REPO/.venv/bin/python" ] && echo "$REPO/.venv/bin/python" || echo python )}"
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
BASE="$1"; WEIGHTS="$2"; OUT="$3"; shift 3
exec "$PYTHON" -m legion.cli merge step2 --base "$BASE" --weights "$WEIGHTS" --output-dir "$OUT" "$@"
