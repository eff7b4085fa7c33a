#!/usr/bin/env bash
# Evaluate the real/fake detector: per-subset accuracy, unweighted mean, AP, real/fake accuracy.
#   bash eval_cls.sh detector_path=runs/legion_7b/detector data.test=data/ufd/test [perturbation=jpeg:50]
#   bash eval_cls.sh --config configs/tiny/eval_cls.yaml      the tiny CPU run on ToyScars
# Relative paths (in key=value, --config and the config's data/model paths) are taken from the current directory.
set -euo pipefail
REPO="$(cd "$(dirname "$0")" && pwd)"
PYTHON="${PYTHON:-$( [ -x "$REPO/.venv/bin/python" ] && echo "$REPO/.venv/bin/python" || echo python )}"
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
exec "$PYTHON" -m legion.cli cls-eval --config "$REPO/configs/legion_7b/eval_cls.yaml" "$@"
