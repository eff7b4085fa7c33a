#!/usr/bin/env bash
# The full-size GPU benchmark as it is run on a lent GPU machine: inference and training in two
# processes (a failure in one keeps the other's results), each under its own time limit.
#
#   bash benchmarks/run_gpu_full_size.sh [OUT_DIR]          # default OUT_DIR: benchmarks/results
#
# Environment: PYTHON (default python3); WHEELS: a folder of wheels to install first into
# /tmp/site (for a machine without a registry; skipped when unset); INFER_LIMIT / TRAIN_LIMIT
# (seconds, default 240 / 300). Writes gpu_full_size_cuda_legion_7b_{infer,train}.{json,md} and
# the logs beside them.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_DIR=${1:-benchmarks/results}
PYTHON=${PYTHON:-python3}
mkdir -p "$OUT_DIR"

source benchmarks/gpu_env.sh

timeout "${INFER_LIMIT:-240}" "$PYTHON" benchmarks/gpu_full_size.py --infer --output-dir "$OUT_DIR" \
  --tag cuda_legion_7b_infer 2>&1 | tee "$OUT_DIR/gpu_full_size_infer.log"
infer_rc=$?
timeout "${TRAIN_LIMIT:-300}" "$PYTHON" benchmarks/gpu_full_size.py --train --cache --steps 5 --output-dir "$OUT_DIR" ${TRAIN_ARGS:-} \
  --tag cuda_legion_7b_train 2>&1 | tee "$OUT_DIR/gpu_full_size_train.log"
train_rc=$?
echo "inference rc=$infer_rc training rc=$train_rc"
exit $(( infer_rc || train_rc ))
