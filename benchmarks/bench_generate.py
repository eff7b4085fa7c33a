"""Grounded generation speed: KV cache (ours) vs the reference's full re-encode per step.

    .venv/bin/python benchmarks/bench_generate.py [--new-tokens 512] [--models tiny,mid] [--batch 1]

For each model size, the same random-weight LegionForCausalLM generates exactly N new tokens
(eos suppressed, so both methods run the full length) on one image with the LEGION prompt:
  - cached:   `generate_grounded(use_cache=True)`  (prompt encoded once, one token per step)
  - reference: `generate_grounded(use_cache=False)` (CLIP + the whole sequence re-run every step,
              as the reference's `use_cache=False` generate does)
Both must produce the same tokens (checked). Prints seconds, tokens/s and the speed-up, and
writes benchmarks/results/bench_generate.json. Sizes: `tiny` is the test preset (hidden 64,
2 layers); `mid` is hidden 512, 8 layers, 8 heads, intermediate 1376, CLIP/SAM as tiny.
"""

from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path

import numpy as np
import torch

from legion.cli_args import add_output_dir_argument
from legion.model import conversation as conv
from legion.model.builders import build_config, build_model, tiny_tokenizer
from legion.model.preprocessing import clip_preprocess, sam_preprocess
from legion.utils.io import atomic_write_json

MID = dict(hidden_size=512, intermediate_size=1376, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=8)


def build(name: str, tokenizer):
    config = build_config("tiny", vocab_size=len(tokenizer))
    if name == "mid":
        for key, value in MID.items():
            setattr(config, key, value)
        config.head_dim = config.hidden_size // config.num_attention_heads
    elif name != "tiny":
        raise SystemExit(f"unknown model size {name!r} (tiny, mid)")
    config.seg_token_idx = conv.special_token_ids(tokenizer, expect_glamm_ids=False).seg
    config.max_position_embeddings = 4096
    return build_model(config, seed=0).eval()


def inputs(model, tokenizer, batch: int):
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (96, 128, 3), dtype=np.uint8)
    clip = clip_preprocess(image, model.config.vision_config["image_size"])[None].repeat(batch, 1, 1, 1)
    pad = model.config.sam_config["image_size"]
    sam, resized = sam_preprocess(image, pad, pad)
    ids = conv.encode_prompt(tokenizer)[None].repeat(batch, 1)
    return dict(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        clip_pixel_values=clip,
        sam_pixel_values=sam[None].repeat(batch, 1, 1, 1),
        sam_resized_sizes=[resized] * batch,
        original_sizes=[image.shape[:2]] * batch,
    )


def timed(model, kwargs, new_tokens: int, use_cache: bool):
    start = time.perf_counter()
    out = model.generate_grounded(**kwargs, max_new_tokens=new_tokens, use_cache=use_cache, eos_token_id=-1)
    return time.perf_counter() - start, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--new-tokens", type=int, default=512)
    parser.add_argument("--models", default="tiny,mid")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    add_output_dir_argument(
        parser,
        metavar="FILE",
        default=str(Path(__file__).parent / "results" / "bench_generate.json"),
        help="JSON result file (default benchmarks/results/bench_generate.json)",
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    tokenizer = tiny_tokenizer()
    rows = []
    for name in args.models.split(","):
        model = build(name, tokenizer)
        kwargs = inputs(model, tokenizer, args.batch)
        with torch.no_grad():
            timed(model, kwargs, 4, True)  # warm-up (allocator, first-call overheads)
            t_cached, cached = timed(model, kwargs, args.new_tokens, True)
            t_ref, ref = timed(model, kwargs, args.new_tokens, False)
        same = all(a.token_ids == b.token_ids for a, b in zip(cached, ref))
        n = len(cached[0].token_ids)
        row = {
            "model": name,
            "params_M": round(sum(p.numel() for p in model.parameters()) / 1e6, 2),
            "prompt_tokens": int(kwargs["input_ids"].shape[1]) - 1 + model.config.num_image_tokens,
            "batch": args.batch,
            "new_tokens": n,
            "cached_s": round(t_cached, 3),
            "reference_s": round(t_ref, 3),
            "cached_tok_per_s": round(args.batch * n / t_cached, 1),
            "reference_tok_per_s": round(args.batch * n / t_ref, 1),
            "speedup": round(t_ref / t_cached, 2),
            "same_tokens": same,
        }
        rows.append(row)
        print(
            f"{name:>5}: {n} new tokens x batch {args.batch} (prompt {row['prompt_tokens']} positions) | "
            f"KV cache {t_cached:.2f}s ({row['cached_tok_per_s']} tok/s) | reference re-encode {t_ref:.2f}s "
            f"({row['reference_tok_per_s']} tok/s) | speed-up {row['speedup']}x | same tokens: {same}",
            flush=True,
        )
    result = {
        "machine": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "rows": rows,
    }
    atomic_write_json(args.output_dir, result)
    print(f"wrote {args.output_dir}")


if __name__ == "__main__":
    main()
