#!/usr/bin/env bash
# The README's test command: set up .venv if needed, then run the whole test suite (slow tests included).
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
exec .venv/bin/python -m pytest -q "$@"
