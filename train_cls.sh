#!/usr/bin/env bash
# Train the real/fake detector head with the paper's settings (docs/model.md §14).
#   bash train_cls.sh [key=value ...]                         e.g. model.backbone=checkpoints/legion_7b
#   bash train_cls.sh --config configs/tiny/train_cls.yaml    the tiny CPU run on ToyScars
set -euo pipefail
cd "$(dirname "$0")"
PYTHON="${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python )}"
exec "$PYTHON" -m legion.cli cls-train --config configs/legion_7b/train_cls.yaml "$@"
