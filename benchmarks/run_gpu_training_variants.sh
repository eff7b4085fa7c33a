#!/usr/bin/env bash
# Full-size training throughput on a lent GPU, one process per variant (a failure keeps the others):
#   baseline   SAM encoder one image per call, torch's per-tensor AdamW, lm_head over the unpadded
#              32,007-token vocabulary (the code before 2026-11-27)
#   defaults   SAM encoder in chunks, fused AdamW, vocabulary-aligned logits, and a torch.profiler
#              breakdown of one step
# (The first run of this script, 2026-11-27, predates the vocabulary alignment: docs/benchmarks.md.)
#   compiled   the defaults + model.compile_layers (torch.compile per LLM decoder layer)
#   recipe     gradient checkpointing on (as configs/legion_7b), micro-batch 1, 2, 4, + encoder cache
# The first three run without gradient checkpointing at micro-batch 4 and 8 (the fastest setting
# measured on an H200 on 2026-11-26). Same machine, same call: their ratios are like for like.
#
#   bash benchmarks/run_gpu_training_variants.sh [OUT_DIR]      # default OUT_DIR: benchmarks/results
#
# Environment: PYTHON (default python3); WHEELS: a folder of wheels installed first into /tmp/site
# (for a machine without a registry); LIMIT (seconds per variant, default 150; compiled gets 1.5x).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_DIR=${1:-benchmarks/results}
PYTHON=${PYTHON:-python3}
LIMIT=${LIMIT:-150}
mkdir -p "$OUT_DIR"
source benchmarks/gpu_env.sh

variant() {  # TAG LIMIT ARGS...
  local tag=$1 limit=$2
  shift 2
  timeout "$limit" "$PYTHON" benchmarks/gpu_full_size.py --train --output-dir "$OUT_DIR" --tag "$tag" "$@" 2>&1 \
    | tee "$OUT_DIR/gpu_full_size_$tag.log"
  echo "$tag rc=${PIPESTATUS[0]}"
}
NO_GC=(--no-gradient-checkpointing --micro-batches 4,8 --steps 5)
variant cuda_legion_7b_train_no_gc_baseline "$LIMIT" "${NO_GC[@]}" --sam-encoder-chunk 1 --no-fused-adamw \
  --logits-vocab-multiple 1
variant cuda_legion_7b_train_no_gc "$LIMIT" "${NO_GC[@]}" --profile 4
variant cuda_legion_7b_train_no_gc_compiled $((LIMIT * 3 / 2)) "${NO_GC[@]}" --compile-layers --warmup 2
variant cuda_legion_7b_train "$LIMIT" --cache --steps 5
