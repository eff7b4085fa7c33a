#!/usr/bin/env bash
# Evaluate the real/fake detector: per-subset accuracy, unweighted mean, AP, real/fake accuracy.
#   bash eval_cls.sh detector=runs/legion_7b/cls data.test=data/ufd/test [perturbation=jpeg:50]
#   bash eval_cls.sh --config configs/tiny/eval_cls.yaml      the tiny CPU run on ToyScars
set -euo pipefail
cd "$(dirname "$0")"
PYTHON="${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python )}"
exec "$PYTHON" -m legion.cli cls-eval --config configs/legion_7b/eval_cls.yaml "$@"
