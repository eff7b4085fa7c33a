"""Training step time with and without the frozen-encoder cache, in one run.

    .venv/bin/python benchmarks/bench_train_step.py                        # tiny model + ToyScars, CPU
    .venv/bin/python benchmarks/bench_train_step.py --model runs/tiny_model --data data/toyscars --steps 10

Builds the loc/exp recipe's model (LoRA + trainable set) and DeepSpeed engine, fills the cache with
one pass over the benchmark batches, then times the same optimizer steps alternately without and
with the cache (ABAB..., so a change in machine load hits both alike). Printed: mean wall and CPU
(process) seconds per step for each, and the ratio uncached / cached. CPU time does not depend on
how busy a shared machine is; wall time does, so the 1-minute load average is printed with it.
With the tiny preset the frozen encoders are a small part of a step; with SAM ViT-H + CLIP-L at
1024 / 336 px they dominate the forward pass, so the ratio there is much larger.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path(__file__).resolve().parents[1] / ".cache" / "torch_extensions"))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="checkpoint dir (default: a fresh `make-tiny` in a temp dir)")
    parser.add_argument("--data", help="SynthScars-layout root (default: 16 ToyScars images in a temp dir)")
    parser.add_argument("--config", default="configs/tiny/train_loc_exp.yaml")
    parser.add_argument("--steps", type=int, default=6, help="timed steps per variant")
    parser.add_argument("--micro-batch", type=int, default=2)
    parser.add_argument("overrides", nargs="*", help="recipe config overrides, e.g. data.sam_input_size=128")
    args = parser.parse_args(argv)

    import deepspeed
    import torch

    from legion.config import load_config
    from legion.data.synthscars import collate
    from legion.train import loc_exp
    from legion.train.encoder_cache import CachedFrozenEncoders, FrozenEncoderCache, encoder_fingerprint

    tmp = Path(tempfile.mkdtemp(prefix="bench_train_step_"))
    model_dir = args.model
    if model_dir is None:
        from legion.model.builders import make_tiny

        model_dir = make_tiny(tmp / "tiny")
    data_dir = args.data
    if data_dir is None:
        from legion.data.toy import make_toy_data

        data_dir = tmp / "toy"
        make_toy_data(data_dir, num_train=16, num_test=1, seed=0, size=128)

    cfg = load_config(
        loc_exp.TrainConfig,
        args.config,
        [
            f"model.path={model_dir}",
            f"data.root={data_dir}",
            f"output_dir={tmp / 'run'}",
            "data.val_size=0",
            f"schedule.global_batch_size={args.micro_batch}",
            *args.overrides,
        ],
    )
    _, world, device = loc_exp.setup_distributed()
    plan = loc_exp.plan_batches(cfg.schedule.global_batch_size, world)
    model, tokenizer, _ = loc_exp.prepare_model(cfg, device)
    train_set, _, preprocessing = loc_exp.build_datasets(cfg, tokenizer, model.config)
    optimizer = loc_exp.build_optimizer(model.named_parameters(), cfg.optim)
    engine, *_ = deepspeed.initialize(
        model=model, optimizer=optimizer, config=loc_exp.build_deepspeed_config(cfg, plan, 10**6, optimizer)
    )
    pad_id = tokenizer.pad_token_id or 0
    batches = [
        collate([train_set[(i * plan.micro_batch + j) % len(train_set)] for j in range(plan.micro_batch)], pad_id)
        for i in range(args.steps)
    ]
    cache = FrozenEncoderCache(
        tmp / "cache", encoder_fingerprint(engine.module, loc_exp.preprocessing_info(preprocessing))
    )
    cached = CachedFrozenEncoders(engine.module, cache)

    def step(batch, use_cache):
        context = cached.for_images(batch["image_paths"]) if use_cache else contextlib.nullcontext()
        wall, cpu = time.perf_counter(), time.process_time()
        with context:
            out = engine(**loc_exp.to_device(batch, device))
        engine.backward(out.loss)
        engine.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - wall, time.process_time() - cpu

    engine.train()
    for batch in batches:  # warm-up + fill the cache (first epoch)
        step(batch, use_cache=True)
    times = {False: [], True: []}
    for batch in batches:
        for use_cache in (False, True):
            times[use_cache].append(step(batch, use_cache))

    def mean(values, index):
        return statistics.mean(v[index] for v in values)

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(
        f"model {model_dir} | data {data_dir} | device {device} | micro-batch {plan.micro_batch} | "
        f"{args.steps} steps each | load avg {load:.1f}"
    )
    for use_cache in (False, True):
        name = "with cache   " if use_cache else "without cache"
        print(f"{name}: {mean(times[use_cache], 0):.3f} s/step wall, {mean(times[use_cache], 1):.3f} s/step CPU")
    print(
        f"step-time ratio without/with cache: wall {mean(times[False], 0) / mean(times[True], 0):.2f}x, "
        f"CPU {mean(times[False], 1) / mean(times[True], 1):.2f}x "
        f"(cache hits {cache.hits}, misses {cache.misses})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
