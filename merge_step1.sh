#!/usr/bin/env bash
# Step 1 of 2: DeepSpeed training checkpoint (ZeRO 0-3) -> one fp32 safetensors state dict.
#   bash merge_step1.sh CKPT_DIR OUT.safetensors [--tag global_stepN]
# CKPT_DIR holds `latest` and global_stepN/; without --tag the tag named in CKPT_DIR/latest is used.
# OUT may also be a directory (sharded when large). Next: merge_step2.sh.
set -euo pipefail
if [ $# -lt 2 ]; then
  sed -n '2,5p' "$0"; exit 2
fi
REPO="$(cd "$(dirname "$0")" && pwd)"
PYTHON="${PYTHON:-$( [ -x "$REPO/.venv/bin/python" ] && echo "$REPO/.venv/bin/python" || echo python )}"
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
CKPT_DIR="$1"; OUT="$2"; shift 2
exec "$PYTHON" -m legion.cli merge step1 "$CKPT_DIR" --output-dir "$OUT" "$@"
