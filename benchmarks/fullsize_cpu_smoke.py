"""Full-size (legion_7b) path on the CPU, with random bf16 weights: proves shapes, dtypes, SAM at
1024 and `[SEG]` recovery without any downloaded weights.

    .venv/bin/python benchmarks/fullsize_cpu_smoke.py [--output-dir benchmarks/results]

Stages (seconds and peak resident memory printed for each):
  1. build LegionForCausalLM(legion_7b) directly in bf16 on the CPU (random init, ~8 B params, ~16.6 GB);
  2. one teacher-forced forward on a 1024x1024 image with a short answer holding two `[SEG]`:
     CE, BCE and Dice losses, masks at the original 1024x1024 resolution;
  3. KV-cached grounded generation of a few tokens in which a `[SEG]` is forced at step 3 (a hook on
     lm_head adds a large logit: random weights never choose it by themselves) and `</s>` at step 5;
     the `[SEG]` state is decoded by SAM into a full-resolution mask.

Needs ~20 GB of free memory; opt-in (not run by the test suite). Text ids come from the tiny
tokenizer with LEGION's special tokens moved to GLaMM's ids 32000..32006 (no LLaMA tokenizer here).
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import time
from pathlib import Path

import numpy as np
import torch

from legion.cli_args import add_output_dir_argument
from legion.model import conversation as conv
from legion.model.builders import FP32_MODULES, build_config, tiny_tokenizer
from legion.model.legion import LegionForCausalLM
from legion.model.preprocessing import clip_preprocess, sam_preprocess
from legion.utils.io import atomic_write_json, atomic_write_text


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2  # KiB on Linux


class Stages:
    def __init__(self):
        self.rows: list[dict] = []
        self._t = time.perf_counter()

    def done(self, name: str, **extra) -> None:
        now = time.perf_counter()
        row = {"stage": name, "seconds": round(now - self._t, 2), "peak_rss_gb": round(peak_rss_gb(), 2), **extra}
        self.rows.append(row)
        print(json.dumps(row), flush=True)
        self._t = time.perf_counter()


def test_image(size: int = 1024) -> np.ndarray:
    y, x = np.mgrid[0:size, 0:size] / size
    img = np.stack([255 * x, 255 * y, 128 + 100 * np.sin(12 * x * y)], -1)
    return img.clip(0, 255).astype(np.uint8)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_output_dir_argument(parser, default="benchmarks/results", help="folder for fullsize_cpu_smoke.{json,md}")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    parser.add_argument(
        "--preset",
        default="legion_7b",
        choices=["legion_7b", "tiny"],
        help="tiny: a seconds-long dry run of this script's logic",
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    stages = Stages()

    # 1. build in bf16 directly (building in fp32 first would need ~33 GB)
    config = build_config(args.preset)
    tokenizer = tiny_tokenizer()
    if config.vocab_size < 32007:  # tiny dry run: the tokenizer's own ids
        config.seg_token_idx = tokenizer.convert_tokens_to_ids(conv.SEG)
    torch.set_default_dtype(torch.bfloat16)
    model = LegionForCausalLM(config).eval()
    torch.set_default_dtype(torch.float32)
    # As in the released checkpoints: SAM and text_hidden_fcs stay fp32, the rest is bf16.
    for name in FP32_MODULES:
        model.get_submodule(name).float()
    n_params = sum(p.numel() for p in model.parameters())
    n_saved = sum(v.numel() for v in model.state_dict().values())
    stages.done(f"build {args.preset} (bf16, random init)", parameters=n_params, state_dict_parameters=n_saved)

    # 2. teacher-forced forward, three losses, masks at 1024x1024
    answer = (
        f"Upon examining the image. I have found: {conv.tag_phrase('the left hand')}:six fingers."
        f"{conv.tag_phrase('the sky')}:banding."
    )
    ids, labels = conv.encode_conversation(tokenizer, answer)
    ids = conv.to_glamm_ids(ids, tokenizer, config.vocab_size)
    labels = conv.to_glamm_ids(labels, tokenizer, config.vocab_size)
    seg_id = config.seg_token_idx
    assert int((ids == seg_id).sum()) == 2
    image = test_image()
    clip = clip_preprocess(image, size=config.vision_config["image_size"])[None].to(torch.bfloat16)
    sam_size = config.sam_config["image_size"]  # 1024 for legion_7b
    sam, resized = sam_preprocess(image, longest_side=sam_size, pad_to=sam_size)
    sam = sam[None].to(torch.bfloat16)
    gt = torch.zeros(2, 1024, 1024)
    gt[0, 100:300, 200:400] = 1
    gt[1, 0:200, :] = 1
    with torch.no_grad():
        out = model(
            input_ids=ids[None],
            attention_mask=torch.ones_like(ids)[None].bool(),
            labels=labels[None],
            clip_pixel_values=clip,
            sam_pixel_values=sam,
            sam_resized_sizes=[resized],
            original_sizes=[(1024, 1024)],
            gt_masks=[gt.to(torch.bfloat16)],
        )
    losses = {k: float(getattr(out, k)) for k in ("loss", "ce_loss", "bce_loss", "dice_loss")}
    assert all(np.isfinite(v) for v in losses.values()), losses
    assert tuple(out.pred_masks[0].shape) == (2, 1024, 1024), out.pred_masks[0].shape
    stages.done(
        "forward + CE/BCE/Dice (1024x1024 image, 2 [SEG])",
        text_tokens=int(ids.numel()),
        sequence_length=int(ids.numel()) - 1 + config.num_image_tokens,
        **losses,
        mask_shape=list(out.pred_masks[0].shape),
    )

    # 3. cached generation that is forced to emit [SEG] at step 3 and </s> at step 5
    eos_id = config.eos_token_id
    calls = {"n": 0}

    def force(_module, _inputs, logits):
        calls["n"] += 1
        forced = {3: seg_id, 5: eos_id}.get(calls["n"])
        if forced is not None:
            logits = logits.clone()
            logits[..., forced] = logits.max() + 1e4
        return logits

    prompt = conv.to_glamm_ids(conv.encode_prompt(tokenizer), tokenizer, config.vocab_size)[None]
    hook = model.lm_head.register_forward_hook(force)
    try:
        gen = model.generate_grounded(
            prompt, torch.ones_like(prompt), clip, sam, [resized], [(1024, 1024)], max_new_tokens=8
        )[0]
    finally:
        hook.remove()
    assert seg_id in gen.token_ids and gen.mask_logits.shape == (1, 1024, 1024), (gen.token_ids, gen.mask_logits.shape)
    stages.done(
        "KV-cached generation, forced [SEG] -> full-resolution mask",
        new_tokens=len(gen.token_ids),
        seg_embedding_shape=list(gen.seg_embeddings.shape),
        mask_shape=list(gen.mask_logits.shape),
        mask_fraction=round(float((gen.mask_logits > 0).float().mean()), 4),
    )

    result = {
        "device": f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)",
        "torch": torch.__version__,
        "dtype": "bfloat16",
        "stages": stages.rows,
        "total_seconds": round(sum(r["seconds"] for r in stages.rows), 1),
        "peak_rss_gb": round(peak_rss_gb(), 2),
    }
    if args.preset != "legion_7b":
        print("dry run: results not written")
        return
    out_dir = Path(args.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out_dir / "fullsize_cpu_smoke.json", result)
    lines = [
        "# Full-size (legion_7b) CPU smoke run",
        "",
        f"Device: {result['device']}, torch {torch.__version__}, random bf16 weights.",
        "",
        "| stage | seconds | peak RSS (GB) |",
        "|---|---|---|",
    ]
    lines += [f"| {r['stage']} | {r['seconds']} | {r['peak_rss_gb']} |" for r in stages.rows]
    lines += [
        "",
        f"Total {result['total_seconds']} s; peak resident memory {result['peak_rss_gb']} GB.",
        "Losses: " + ", ".join(f"{k} {v:.4f}" for k, v in losses.items()),
    ]
    atomic_write_text(out_dir / "fullsize_cpu_smoke.md", "\n".join(lines) + "\n")
    print(f"wrote {out_dir}/fullsize_cpu_smoke.json and .md")


if __name__ == "__main__":
    main()
