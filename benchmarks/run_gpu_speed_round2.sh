#!/usr/bin/env bash
# Issue 21 on one lent GPU (an H200), in one call of at most ~8 minutes including the model builds: every
# before/now comparison of benchmarks/gpu_full_size.py --compare, in two processes (a failure or a timeout in
# one keeps the other's results; each writes its JSON + markdown after every measurement).
#
#   bash benchmarks/run_gpu_speed_round2.sh [OUT_DIR]          # default OUT_DIR: benchmarks/results
#
#   1. inference (INFER_LIMIT s, default 200): one image end to end, 512 tokens + 3 masks, generate_grounded
#      before (a host read per token, torch's attention kernels, a new CUDA graph per call, SAM fp32) vs now,
#      now + fused q/k/v and gate/up, each change undone alone; the dynamic decode (64 tokens) with torch's vs
#      our attention kernels, each profiled (is cuDNN building plans?); throughput at batch 8 / 32 / 64 (before
#      at 8 and 32); `legion infer` over 64 1024x1024 JPEGs at batch 32 with 0 and 4 loader workers.
#   2. training (TRAIN_LIMIT s, default 250): the 7B recipe's step before (checkpointing, eager, micro-batch 2,
#      logits over every position) vs its new defaults (`auto` resolved for this GPU: no checkpointing, compiled
#      layers, sequence buckets, chunked CE), host syncs per step, the chunked CE alone, a profile, then the
#      8-GPU layout's micro-batch. Results carry "recipe_defaults": true where the settings are the config's.
#
# Environment: PYTHON (default python3); WHEELS: a folder of wheels installed first into /tmp/site (for a
# machine without a registry, see gpu_env.sh); INFER_LIMIT / TRAIN_LIMIT (seconds). Writes
# gpu_full_size_cuda_legion_7b_round2_{infer,train}.{json,md,log} (+ nvidia_smi.csv, versions.txt) in OUT_DIR.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_DIR=${1:-benchmarks/results}
PYTHON=${PYTHON:-python3}
mkdir -p "$OUT_DIR"
source benchmarks/gpu_env.sh
start=$(date +%s)

stage() {  # NAME LIMIT ARGS...: one process under its own time limit, its output teed to a log
  local name=$1 limit=$2
  shift 2
  timeout --kill-after=10 "$limit" "$PYTHON" benchmarks/gpu_full_size.py --compare --output-dir "$OUT_DIR" \
    --tag "cuda_legion_7b_round2_$name" "$@" 2>&1 | tee "$OUT_DIR/gpu_full_size_cuda_legion_7b_round2_$name.log"
  local rc=${PIPESTATUS[0]}
  echo "stage $name rc=$rc after $(( $(date +%s) - start )) s" | tee -a "$OUT_DIR/gpu_full_size_cuda_legion_7b_round2.status"
  return 0
}

: >"$OUT_DIR/gpu_full_size_cuda_legion_7b_round2.status"
stage infer "${INFER_LIMIT:-200}" --infer --new-tokens 512 --compare-repeats 2 --dynamic-tokens 64 \
  --compare-batches 8,32,64 --before-batches 8,32 --pipeline-images 64 --pipeline-batch 32 --pipeline-workers 0,4
stage train "${TRAIN_LIMIT:-250}" --train --steps 4 --warmup 2 --profile 8
echo "all stages done after $(( $(date +%s) - start )) s" | tee -a "$OUT_DIR/gpu_full_size_cuda_legion_7b_round2.status"
