#!/usr/bin/env bash
# Re-take docs/app.png (the README's screenshot of `legion app`) with the browser test, on the model and
# detector that `bash scripts/demo.sh` trained. Shows a ToyScars test image the demo's detector calls fake.
# Usage: bash scripts/screenshot_app.sh [IMAGE_NAME (default test_00058.png)] [DEMO_DIR (default demo_out)]
set -euo pipefail
cd "$(dirname "$0")/.."
image="${1:-test_00058.png}"
demo="$(realpath "${2:-demo_out}")"
for path in "$demo/model" "$demo/detector" "$demo/data/test/images/$image"; do
    [ -e "$path" ] || { echo "screenshot_app: $path not found (run bash scripts/demo.sh first)" >&2; exit 2; }
done
shots="$(mktemp -d)"
trap 'rm -rf "$shots"' EXIT
cp "$demo/data/test/images/$image" "$shots/"
export HF_HUB_OFFLINE=1 MPLBACKEND=Agg
LEGION_APP_MODEL="$demo/model" LEGION_APP_DETECTOR="$demo/detector" LEGION_APP_MAX_NEW_TOKENS=160 \
LEGION_APP_EXAMPLES="$shots:$demo/data/test/images:$demo/data/detection/test/toyscars/0_real" \
LEGION_SCREENSHOT_DIR="$PWD/docs" \
    .venv/bin/python -m pytest -q tests/test_app.py -k "page or endpoint" -p no:cacheprovider
echo "wrote docs/app.png"
