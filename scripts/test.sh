#!/usr/bin/env bash
# The README's test command: set up .venv if needed, then run the whole test suite (slow tests included).
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -m "not slow" -x`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 DS_ACCELERATOR=cpu
export TORCH_EXTENSIONS_DIR="$PWD/.cache/torch_extensions"
export MPLBACKEND=Agg
exec .venv/bin/python -m pytest -q "$@"
