#!/usr/bin/env bash
# Explain + segment artifacts in a folder of images with a merged LEGION model.
#   bash infer_loc_exp.sh MODEL_DIR IMAGE_DIR OUTPUT_DIR [key=value ...]
#   NPROC=8 bash infer_loc_exp.sh ...                 # torchrun, one GPU per rank, images split by rank
#   CONFIG=configs/tiny/infer.yaml bash infer_loc_exp.sh ...   # the tiny CPU model
# e.g. bash infer_loc_exp.sh checkpoints/legion_7b data/my_images runs/infer detector_path=runs/detector
# Keys: `legion infer --help`; docs/inference.md. Output: OUTPUT_DIR/predictions.jsonl (+ reference layout).
set -euo pipefail
if [ $# -lt 3 ]; then
  sed -n '2,7p' "$0"; exit 2
fi
REPO="$(cd "$(dirname "$0")" && pwd)"
PYTHON="${PYTHON:-$( [ -x "$REPO/.venv/bin/python" ] && echo "$REPO/.venv/bin/python" || echo python )}"
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
CONFIG="${CONFIG:-$REPO/configs/legion_7b/infer.yaml}"
MODEL="$1"; IMAGES="$2"; OUT="$3"; shift 3
ARGS=(infer --config "$CONFIG" "model_path=$MODEL" "image_dir=$IMAGES" "output_dir=$OUT" "$@")
if [ "${NPROC:-1}" -gt 1 ]; then
  exec "$PYTHON" -m torch.distributed.run --nproc_per_node "$NPROC" -m legion.cli "${ARGS[@]}"
fi
exec "$PYTHON" -m legion.cli "${ARGS[@]}"
