"""What the inference dtype policy changes: `reference` (whole model in bf16, as the released
infer.py) against `fp32_grounding` (SAM and text_hidden_fcs in fp32), same model, same images.

    .venv/bin/python benchmarks/bench_dtype_policy.py --model demo_out/merged_model \
        --images demo_out/data/test/images --limit 40 [--output-dir benchmarks/results/dtype_policy_tiny.json]

Both runs load the model in bf16 (`dtype=bfloat16`) and decode greedily. Printed: how many images
got the same answer tokens, the IoU between the two policies' masks where the answers agree
(per phrase), how many mask pixels differ, and the seconds per image of each (the ratio is the
speed of `reference` against `fp32_grounding`, measured in this run).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from legion.cli_args import add_output_dir_argument  # noqa: E402
from legion.data.images import read_image  # noqa: E402
from legion.infer import Analyzer, AnalyzerConfig, list_images  # noqa: E402
from legion.utils.io import atomic_write_json  # noqa: E402
from legion.utils.rle import rle_to_mask  # noqa: E402


def run(policy: str, model: str, images: list[np.ndarray], max_new_tokens: int, sam_input_size) -> tuple[list, float]:
    analyzer = Analyzer.from_config(
        AnalyzerConfig(
            model_path=model,
            device="cpu",
            dtype="bfloat16",
            dtype_policy=policy,
            max_new_tokens=max_new_tokens,
            sam_input_size=sam_input_size,
        )
    )
    start = time.perf_counter()
    records = [analyzer.analyze([image])[0] for image in images]
    return records, (time.perf_counter() - start) / max(1, len(images))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--images", required=True)
    parser.add_argument("--limit", type=int, default=40)
    parser.add_argument("--max-new-tokens", type=int, default=160)
    parser.add_argument("--sam-input-size", type=int, default=None)
    parser.add_argument("--threads", type=int, default=1)
    add_output_dir_argument(parser, metavar="FILE", help="also write the result as JSON here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    listing = list_images(args.images)
    paths = [path for _, path in listing.items[: args.limit]]
    images = [read_image(p) for p in paths]
    ref, ref_s = run("reference", args.model, images, args.max_new_tokens, args.sam_input_size)
    ours, ours_s = run("fp32_grounding", args.model, images, args.max_new_tokens, args.sam_input_size)
    same_text = [a.raw_text == b.raw_text for a, b in zip(ref, ours)]
    ious, differing, pixels = [], 0, 0
    for a, b, same in zip(ref, ours, same_text):
        if not same:
            continue
        for ma, mb in zip(a.masks, b.masks):
            x, y = rle_to_mask(ma).astype(bool), rle_to_mask(mb).astype(bool)
            union = (x | y).sum()
            ious.append(1.0 if union == 0 else (x & y).sum() / union)
            differing += int((x ^ y).sum())
            pixels += x.size
    result = {
        "model": args.model,
        "images": len(images),
        "max_new_tokens": args.max_new_tokens,
        "same_answer_tokens": int(sum(same_text)),
        "masks_compared": len(ious),
        "mask_iou_mean": float(np.mean(ious)) if ious else None,
        "mask_iou_min": float(np.min(ious)) if ious else None,
        "mask_pixels_differing_fraction": differing / pixels if pixels else None,
        "seconds_per_image": {"reference": round(ref_s, 4), "fp32_grounding": round(ours_s, 4)},
        "speed_ratio_reference_vs_fp32_grounding": round(ours_s / ref_s, 3) if ref_s else None,
        "device": "cpu",
        "threads": args.threads,
        "torch": torch.__version__,
    }
    print(json.dumps(result, indent=2))
    if args.output_dir:
        atomic_write_json(args.output_dir, result)


if __name__ == "__main__":
    main()
