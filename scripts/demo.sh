#!/usr/bin/env bash
# The README's main command: set up .venv if needed, then run the whole pipeline on ToyScars with a
# tiny model (CPU, about 15 minutes on 2 cores) and write demo_out/report.html.
# Options go to `legion demo` (see `--help`), e.g. `bash scripts/demo.sh --fresh`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 DS_ACCELERATOR=cpu TOKENIZERS_PARALLELISM=false
export TORCH_EXTENSIONS_DIR="$PWD/.cache/torch_extensions"
export MPLBACKEND=Agg
# The tiny model's ops are small: one OpenMP thread per process is faster than two competing ones.
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
exec .venv/bin/legion demo "$@"
