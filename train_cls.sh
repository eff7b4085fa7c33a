#!/usr/bin/env bash
# Train the real/fake detector head with the paper's settings (docs/model.md §14).
#   bash train_cls.sh [key=value ...]                         e.g. model.backbone=checkpoints/legion_7b
#   bash train_cls.sh --config configs/tiny/train_cls.yaml    the tiny CPU run on ToyScars
# Relative paths (in key=value, --config and the config's data/model paths) are taken from the current directory.
set -euo pipefail
REPO="$(cd "$(dirname "$0")" && pwd)"
PYTHON="${PYTHON:-$( [ -x "$REPO/.venv/bin/python" ] && echo "$REPO/.venv/bin/python" || echo python )}"
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
exec "$PYTHON" -m legion.cli cls-train --config "$REPO/configs/legion_7b/train_cls.yaml" "$@"
