#!/usr/bin/env bash
# The README's test command: set up .venv if needed, lint (ruff), then run the whole test suite (slow tests included).
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -m "not slow" -x`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
# The report page is tested in a real browser: Debian's chromium (root + apt, as on CI machines).
if ! command -v chromium >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "[setup] installing Debian's chromium for the browser test"
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
        || echo "[setup] could not install chromium; the browser test will fail" >&2
fi
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 DS_ACCELERATOR=cpu
export TORCH_EXTENSIONS_DIR="$PWD/.cache/torch_extensions"
export MPLBACKEND=Agg
# Lint and formatting first (seconds): a failure here fails the test command, and CI with it.
.venv/bin/ruff check . && .venv/bin/ruff format --check . >/dev/null || {
    echo "[lint] ruff found problems: run .venv/bin/ruff check --fix . && .venv/bin/ruff format ." >&2; exit 1; }
exec .venv/bin/python -m pytest -q "$@"
