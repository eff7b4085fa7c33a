#!/usr/bin/env bash
# The tiny learning proof (configs/tiny/train_loc_exp.yaml on ToyScars) for several seeds at once, all
# sharing one lent GPU: how much the held-out foreground IoU varies from seed to seed. Each seed runs
# the real path: `legion train`, `legion infer` (KV-cached generation) and `legion eval localization`
# on the 100 test images. The issue's 10-minute figure is for the CPU (docs/training.md); this is
# the spread, not a timing.
#
#   bash benchmarks/run_gpu_tiny_seeds.sh [OUT_DIR] [SEED ...]     # default: benchmarks/results, 45..50
#
# Environment: PYTHON (default python3); WHEELS (see gpu_env.sh); LIMIT (seconds per seed, default 540).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_DIR=${1:-benchmarks/results}
shift $(( $# > 0 ? 1 : 0 ))
SEEDS=("$@")
[[ ${#SEEDS[@]} -gt 0 ]] || SEEDS=(45 46 47 48 49 50)
PYTHON=${PYTHON:-python3}
LIMIT=${LIMIT:-540}
mkdir -p "$OUT_DIR"
source benchmarks/gpu_env.sh
export OMP_NUM_THREADS=2
WORK=$(mktemp -d /tmp/tiny_seeds.XXXX)
legion() { "$PYTHON" -m legion.cli "$@"; }

legion make-tiny --output-dir "$WORK/tiny" >/dev/null && legion make-toy-data --output-dir "$WORK/toy" >/dev/null || exit 1

one_seed() {  # SEED: train, infer, evaluate; everything in $WORK/run<SEED>
  local run=$WORK/run$1
  legion train --config configs/tiny/train_loc_exp.yaml model.path="$WORK/tiny" data.root="$WORK/toy" \
      output_dir="$run" seed="$1" logging.progress=false \
    && legion infer --config configs/tiny/infer.yaml model_path="$run/final_model" device=cuda \
      image_dir="$WORK/toy/test/images" output_dir="$run/infer" max_new_tokens=160 progress=false \
      save_reference_layout=false save_phrase_masks=false save_overlay=false \
    && legion eval localization --pred "$run/infer/predictions.jsonl" --gt "$WORK/toy" --dataset synthscars \
      --output-dir "$run/eval_loc" --no-plots
}

for seed in "${SEEDS[@]}"; do
  ( start=$(date +%s)
    timeout "$LIMIT" bash -c "$(declare -f legion one_seed); WORK=$WORK PYTHON=$PYTHON one_seed $seed" \
      >"$WORK/seed$seed.log" 2>&1
    echo "seed $seed rc=$? wall_s=$(( $(date +%s) - start ))" | tee -a "$WORK/status.txt" ) &
done
wait

"$PYTHON" - "$WORK" "$OUT_DIR" "${SEEDS[@]}" <<'PY'
import json, pathlib, statistics, sys
work, out, seeds = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2]), sys.argv[3:]
status = {line.split()[1]: line.split()[2:] for line in (work / "status.txt").read_text().splitlines()}
rows, log = [], []
for seed in seeds:
    run = work / f"run{seed}"
    metrics = run / "eval_loc" / "metrics.json"
    train_log = [json.loads(l) for l in (run / "log.jsonl").read_text().splitlines()] if (run / "log.jsonl").is_file() else []
    steps = [r for r in train_log if r["event"] == "train"]
    vals = [r for r in train_log if r["event"] == "validation"]
    row = {"seed": int(seed), "status": " ".join(status.get(seed, ["missing"])), "steps": len(steps),
           "val_giou": vals[-1].get("val_giou") if vals else None}
    if metrics.is_file():
        overall = json.loads(metrics.read_text())["overall"]
        row.update(fg_iou=overall["fg_iou"], miou=overall["miou"], f1=overall["f1"], num_images=overall["num_images"])
    else:
        log.append(f"== seed {seed}: no metrics; log tail\n" + "\n".join(
            (work / f"seed{seed}.log").read_text(errors="replace").splitlines()[-40:]))
    rows.append(row)
fg = [r["fg_iou"] for r in rows if "fg_iou" in r]
summary = {"rows": rows, "fg_iou_mean": statistics.mean(fg) if fg else None,
           "fg_iou_min": min(fg) if fg else None, "fg_iou_max": max(fg) if fg else None}
(out / "tiny_seeds_gpu.json").write_text(json.dumps(summary, indent=2))
lines = ["| seed | steps | fg IoU | mIoU | F1 | val gIoU | status |", "|---|---|---|---|---|---|---|"]
for r in rows:
    f = lambda k: f"{r[k]:.1f}" if isinstance(r.get(k), (int, float)) else "-"
    lines.append(f"| {r['seed']} | {r['steps']} | {f('fg_iou')} | {f('miou')} | {f('f1')} | "
                 f"{'-' if r['val_giou'] is None else round(r['val_giou'], 3)} | {r['status']} |")
if fg:
    lines.append(f"\nfg IoU over {len(fg)} seeds: mean {summary['fg_iou_mean']:.1f}, min {min(fg):.1f}, max {max(fg):.1f}")
(out / "tiny_seeds_gpu.md").write_text("\n".join(lines) + "\n")
(out / "tiny_seeds_gpu.log").write_text("\n\n".join(log) + "\n")
print("\n".join(lines))
PY
