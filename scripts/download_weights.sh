#!/usr/bin/env bash
# Download what the README's GPU-cluster section needs, with `hf download` (huggingface_hub's CLI),
# into the layout the configs expect. Needs the network; run it on a login node.
#
#   bash scripts/download_weights.sh              # base model, CLIP, released LEGION weights, SynthScars
#   bash scripts/download_weights.sh base clip    # only some of: base clip legion sam synthscars
#   DRY_RUN=1 bash scripts/download_weights.sh    # print the commands, download nothing
#
# Where things go (relative to the repository, whatever the current directory):
#   checkpoints/GLaMM-GranD-Pretrained/         MBZUAI/GLaMM-GranD-Pretrained (the base LEGION fine-tunes)
#   checkpoints/clip-vit-large-patch14-336/     openai/clip-vit-large-patch14-336 (in no GLaMM/LEGION checkpoint)
#   checkpoints/legion_LE/                      khr0516/legion_LE (released loc/exp weights, intermediate)
#   checkpoints/sam_vit_h_4b8939.pth            SAM ViT-H (optional: GLaMM checkpoints carry SAM), Meta's URL
#   data/SynthScars/                            khr0516/SynthScars (dataset)
# Not on the Hub under a known id, so not here: LOKI, RichHF-18K, CNNDetection / UniversalFakeDetect
# (see data/README.md for their layout). Gated repositories need `hf auth login` (or HF_TOKEN) first.
set -euo pipefail
REPO="$(cd "$(dirname "$0")/.." && pwd)"
HF="${HF:-$( [ -x "$REPO/.venv/bin/hf" ] && echo "$REPO/.venv/bin/hf" || echo hf )}"
SAM_URL="https://dl.fbaipublicfiles.com/segment_anything/sam_vit_h_4b8939.pth"
ALL=(base clip legion synthscars)
items=("$@")
[ ${#items[@]} -eq 0 ] && items=("${ALL[@]}")

run() {
    echo "+ $*"
    if [ -z "${DRY_RUN:-}" ]; then "$@"; fi
}

if [ -z "${DRY_RUN:-}" ] && [ -n "${HF_HUB_OFFLINE:-}${TRANSFORMERS_OFFLINE:-}" ]; then
    echo "download_weights.sh: HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE is set; unset it to download" >&2
    exit 2
fi
if [ -z "${DRY_RUN:-}" ] && ! command -v "$HF" >/dev/null 2>&1; then
    echo "download_weights.sh: the 'hf' command is missing: bash scripts/setup_env.sh (or pip install huggingface_hub)" >&2
    exit 2
fi

for item in "${items[@]}"; do
    case "$item" in
        base)       run "$HF" download MBZUAI/GLaMM-GranD-Pretrained --local-dir "$REPO/checkpoints/GLaMM-GranD-Pretrained" ;;
        clip)       run "$HF" download openai/clip-vit-large-patch14-336 --local-dir "$REPO/checkpoints/clip-vit-large-patch14-336" ;;
        legion)     run "$HF" download khr0516/legion_LE --local-dir "$REPO/checkpoints/legion_LE" ;;
        synthscars) run "$HF" download khr0516/SynthScars --repo-type dataset --local-dir "$REPO/data/SynthScars" ;;
        sam)        run curl -L --fail -o "$REPO/checkpoints/sam_vit_h_4b8939.pth" "$SAM_URL" ;;
        *) echo "download_weights.sh: unknown item '$item' (choose from: base clip legion sam synthscars)" >&2; exit 2 ;;
    esac
done
if [ -z "${DRY_RUN:-}" ]; then
    echo "done. Check the data with: $REPO/.venv/bin/legion data check --root $REPO/data/SynthScars --split test"
fi
