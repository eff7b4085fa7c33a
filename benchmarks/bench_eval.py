"""Benchmark: localization evaluation of N images at SIZE x SIZE (target: 1,000 at 1024 in < 30 s, 2 cores).

    .venv/bin/python benchmarks/bench_eval.py [--images 1000] [--size 1024] [--workers 2] [--baseline-images 100]

Synthetic but realistic inputs: per image 1-3 ground-truth polygons (SynthScars-like, rasterized
from polygons during evaluation) and 0-4 predicted masks stored as COCO RLE in a predictions.jsonl
written to a temporary folder. Timed: reading predictions.jsonl + matching + rasterizing GT +
all metrics (``evaluate_localization``). Image sizes are given, not read from image headers.

The naive baseline is what a straightforward per-image script does (the reference's style):
decode every mask to a dense array, rasterize the GT densely, compute IoU / F1 with boolean and
float array operations. It runs on the first ``--baseline-images`` images in the same process and
its per-image time is scaled to N; both paths' metrics are checked to agree on that subset.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from legion.cli_args import add_output_dir_argument  # noqa: E402
from legion.eval.ground_truth import GroundTruthItem, polygons_to_rle, read_predictions  # noqa: E402
from legion.eval.localization import evaluate_localization  # noqa: E402
from legion.utils.io import atomic_write_json  # noqa: E402
from legion.utils.rle import rle_to_mask  # noqa: E402


def random_polygon(rng, size: int) -> list[float]:
    cx, cy = rng.uniform(0, size, 2)
    radius = rng.uniform(20, size / 6)
    angles = np.sort(rng.uniform(0, 2 * np.pi, rng.integers(5, 14)))
    r = radius * rng.uniform(0.5, 1.0, len(angles))
    return np.stack([cx + r * np.cos(angles), cy + r * np.sin(angles)], 1).clip(0, size - 1).ravel().tolist()


def make_inputs(n: int, size: int, seed: int, folder: Path) -> tuple[dict[str, GroundTruthItem], Path]:
    rng = np.random.default_rng(seed)
    gt, lines = {}, []
    for i in range(n):
        name = f"img_{i:05d}.png"
        gt_polys = [[random_polygon(rng, size)] for _ in range(rng.integers(1, 4))]
        gt[name] = GroundTruthItem(name=name, size=(size, size), phrase_polygons=gt_polys, raster="coco")
        k = int(rng.integers(0, 5))
        pred_polys = [random_polygon(rng, size) for _ in range(k)]
        if k and rng.random() < 0.5:  # half of the predictions overlap a GT artifact
            pred_polys[0] = gt_polys[0][0]
        masks = [polygons_to_rle([p], size, size) for p in pred_polys]
        union = polygons_to_rle(pred_polys, size, size) if k else None
        lines.append(
            json.dumps(
                {
                    "image": name,
                    "width": size,
                    "height": size,
                    "verdict": "fake",
                    "masks": masks,
                    "union_mask": union,
                    "explanation": "x",
                }
            )
        )
    pred_path = folder / "predictions.jsonl"
    pred_path.write_text("\n".join(lines) + "\n")
    return gt, pred_path


def naive_evaluate(pred_path: Path, gt: dict[str, GroundTruthItem], names: list[str]) -> dict:
    """Dense, per-image, reference-style evaluation (the baseline)."""
    from legion.data.synthscars import rasterize_polygons

    preds = {}
    with open(pred_path) as fh:
        for line in fh:
            rec = json.loads(line)
            preds[rec["image"]] = rec
    miou, f1, inter_sum, union_sum = [], [], 0.0, 0.0
    for name in names:
        item = gt[name]
        h, w = item.size
        g = np.zeros((h, w), dtype=np.uint8)
        for polys in item.phrase_polygons:
            g |= rasterize_polygons(polys, h, w)
        p = np.zeros((h, w), dtype=np.uint8)
        for m in preds[name]["masks"]:
            p = np.logical_or(p, rle_to_mask(m)).astype(np.uint8)
        ious = []
        for c in (0, 1):
            pc, gc = (p == c), (g == c)
            ious.append(np.logical_and(pc, gc).sum() / (np.logical_or(pc, gc).sum() + 1e-6))
        miou.append(np.mean(ious))
        tp = float(np.sum((p == 1) & (g == 1)))
        fp = float(np.sum((p == 1) & (g == 0)))
        fn = float(np.sum((p == 0) & (g == 1)))
        prec = tp / (tp + fp) if tp + fp > 0 else 0.0
        rec_ = tp / (tp + fn) if tp + fn > 0 else 0.0
        f1.append(1.0 if tp + fp + fn == 0 else (0.0 if prec + rec_ == 0 else 2 * prec * rec_ / (prec + rec_)))
        inter_sum += tp
        union_sum += tp + fp + fn
    return {
        "miou": 100 * float(np.mean(miou)),
        "f1": 100 * float(np.mean(f1)),
        "global_fg_iou": 100 * inter_sum / union_sum,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--baseline-images", type=int, default=100, help="images the naive baseline runs on")
    parser.add_argument("--seed", type=int, default=0)
    add_output_dir_argument(
        parser, metavar="FILE", help="also write the figures as JSON here (e.g. benchmarks/results/bench_eval.json)"
    )
    parser.add_argument("--rouge-pairs", type=int, default=1000, help="also time ROUGE-L on this many pairs (0: skip)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        gt, pred_path = make_inputs(args.images, args.size, args.seed, Path(tmp))
        print(
            f"inputs: {args.images} images at {args.size}x{args.size}, predictions.jsonl "
            f"{pred_path.stat().st_size / 1e6:.1f} MB (generated in {time.perf_counter() - t0:.1f} s)"
        )

        start = time.perf_counter()
        result = evaluate_localization(read_predictions(pred_path), gt, workers=args.workers)
        fast_s = time.perf_counter() - start
        o = result.metrics["overall"]
        print(
            f"fast:  {fast_s:.2f} s for {args.images} images ({1000 * fast_s / args.images:.2f} ms/image, "
            f"workers={args.workers}, cpus={os.cpu_count()})  mIoU {o['miou']:.2f}  F1 {o['f1']:.2f}  "
            f"gFG IoU {o['global_fg_iou']:.2f}"
        )

        n_base = min(args.baseline_images, args.images)
        names = list(gt)[:n_base]
        start = time.perf_counter()
        base = naive_evaluate(pred_path, gt, names)
        base_s = time.perf_counter() - start
        base_est = base_s / n_base * args.images
        print(
            f"naive: {base_s:.2f} s for {n_base} images ({1000 * base_s / n_base:.2f} ms/image) "
            f"-> {base_est:.1f} s estimated for {args.images}"
        )

        # the two paths agree on the baseline subset
        sub = evaluate_localization(read_predictions(pred_path), {n: gt[n] for n in names}, workers=1)
        so = sub.metrics["overall"]
        for key in ("miou", "f1", "global_fg_iou"):
            if abs(so[key] - base[key]) > 1e-6:
                print(f"MISMATCH {key}: fast {so[key]} vs naive {base[key]}")
                return 1
        print(f"check: fast == naive on {n_base} images (mIoU {so['miou']:.4f}, F1 {so['f1']:.4f})")
        print(f"speed-up vs naive: {base_est / fast_s:.1f}x; target < 30 s: {'PASS' if fast_s < 30 else 'FAIL'}")
    results = {
        "images": args.images,
        "size": args.size,
        "workers": args.workers,
        "cpus": os.cpu_count(),
        "load_average_1min": os.getloadavg()[0],
        "fast_s": round(fast_s, 3),
        "naive_s_per_image": round(base_s / n_base, 4),
        "naive_images": n_base,
        "naive_estimated_s": round(base_est, 1),
        "speedup": round(base_est / fast_s, 1),
    }
    if args.rouge_pairs:
        results["rouge"] = bench_rouge(args.rouge_pairs, args.seed)
    if args.output_dir:
        atomic_write_json(args.output_dir, results, indent=1)
        print(f"wrote {args.output_dir}")
    return 0


def bench_rouge(n: int, seed: int) -> dict:
    """ROUGE-L of n caption-length pairs: our path vs calling rouge-score (on n // 10 pairs)."""
    import random

    from legion.eval.explanation import rouge_l

    rng = random.Random(seed)
    words = (
        "the man's right ear is tilted at an incorrect angle hand has six fingers distorted blurry "
        "texture shadow direction inconsistent with light source zipper fused twisted missing"
    ).split()
    texts = [" ".join(rng.choices(words, k=rng.randint(40, 200))) for _ in range(200)]
    pairs = [(texts[rng.randrange(200)], texts[rng.randrange(200)]) for _ in range(n)]
    rouge_l("warm up", "warm up", exact=True)  # imports, outside the timing
    start = time.perf_counter()
    fast = [rouge_l(r, p) for r, p in pairs]
    fast_s = time.perf_counter() - start
    m = max(1, n // 10)
    start = time.perf_counter()
    exact = [rouge_l(r, p, exact=True) for r, p in pairs[:m]]
    exact_s = time.perf_counter() - start
    same = fast[:m] == exact
    print(
        f"rouge-L: {fast_s:.2f} s for {n} pairs; rouge-score {exact_s:.2f} s for {m} -> {exact_s / m * n:.1f} s "
        f"estimated ({exact_s / m * n / fast_s:.0f}x); identical: {same}"
    )
    return {
        "pairs": n,
        "fast_s": round(fast_s, 3),
        "rouge_score_estimated_s": round(exact_s / m * n, 2),
        "identical": same,
    }


if __name__ == "__main__":
    sys.exit(main())
