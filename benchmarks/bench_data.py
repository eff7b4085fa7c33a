"""Training-dataloader throughput: samples/s of SynthScarsDataset + collate on 1024x1024 JPEGs.

    .venv/bin/python benchmarks/bench_data.py                      # SAM 512 and 1024, 1 and 2 workers
    .venv/bin/python benchmarks/bench_data.py --num-images 64 --samples 96 --json benchmarks/results/bench_data.json

Each sample = JPEG decode + 2 polygon masks at 1024x1024 + CLIP (336) + SAM ResizeLongestSide(S) padded
to 1024, batched by `collate` (batch size 2). Target: >= 20 samples/s per worker at S = 512, so the
data never starves a GPU. Worker start-up is excluded (the first batches are a warm-up). Also printed:
CPU milliseconds per sample in-process (process time), which does not depend on how busy the machine
is; wall-clock figures with workers do, so the 1-minute load average is recorded with them.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from legion.data.synthscars import (  # noqa: E402
    MARKER,
    PREFIX,
    EpochSampler,
    Record,
    Ref,
    SynthScarsDataset,
    collate,
    records_to_json,
)
from legion.data.toy import caption_corpus  # noqa: E402
from legion.utils.io import atomic_write_text  # noqa: E402


def make_jpeg_dataset(root: Path, num_images: int, size: int = 1024, seed: int = 0) -> None:
    """Photo-like JPEGs (smooth colour fields + fine grain, quality 90) with 2 polygon refs each."""
    rng = np.random.default_rng(seed)
    (root / "train" / "images").mkdir(parents=True, exist_ok=True)
    (root / "train" / "annotations").mkdir(parents=True, exist_ok=True)
    records = []
    for i in range(num_images):
        coarse = rng.uniform(0, 255, (9, 9, 3)).astype(np.uint8)
        smooth = np.asarray(Image.fromarray(coarse).resize((size, size), Image.Resampling.BICUBIC), np.float32)
        grain = rng.normal(0, 12, (size, size, 1)).astype(np.float32)
        image = np.clip(smooth + grain, 0, 255).astype(np.uint8)
        name = f"img_{i:04d}.jpg"
        Image.fromarray(image).save(root / "train" / "images" / name, quality=90)
        refs = []
        for k in range(2):
            cx, cy, r = rng.uniform(200, 824), rng.uniform(200, 824), rng.uniform(60, 180)
            angles = np.linspace(0, 2 * np.pi, 12, endpoint=False)
            poly = np.stack([cx + r * np.cos(angles), cy + r * np.sin(angles)], 1).ravel().tolist()
            refs.append(Ref(f"The blurred patch number {k}", f"The area {k} is blurred.", [poly]))
        caption = (
            PREFIX + "A test image, with two patches." + MARKER + "".join(f"{r.sentence}:{r.explanation}" for r in refs)
        )
        records.append(Record(str(i), name, caption, refs))
    (root / "train" / "annotations" / "train.json").write_text(json.dumps(records_to_json(records)))


def measure(dataset, workers: int, samples: int, batch_size: int = 2, warmup_batches: int = 2) -> float:
    sampler = EpochSampler(len(dataset), seed=0)
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        collate_fn=collate,
        num_workers=workers,
        persistent_workers=False,
        prefetch_factor=4,
    )
    seen, start = 0, None
    epoch = 0
    while True:
        sampler.set_epoch(epoch)
        for i, batch in enumerate(loader):
            if start is None and i + 1 >= warmup_batches:
                start = time.perf_counter()  # workers are up and the pipeline is primed
                continue
            if start is not None:
                seen += len(batch["record_ids"])
                if seen >= samples:
                    return seen / (time.perf_counter() - start)
        epoch += 1


def cpu_ms_per_sample(dataset, samples: int) -> float:
    """CPU time of one sample in this process (load-independent): the ideal per-worker cost."""
    collate([dataset[0]])
    start = time.process_time()
    for i in range(samples):
        collate([dataset[i % len(dataset)]])
    return 1000 * (time.process_time() - start) / samples


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-images", type=int, default=48, help="distinct JPEGs to generate (default 48)")
    parser.add_argument("--samples", type=int, default=80, help="samples timed per setting (default 80)")
    parser.add_argument("--sam-sizes", type=int, nargs="+", default=[512, 1024])
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--torch-threads", type=int, default=1, help="torch threads per worker (default 1)")
    parser.add_argument("--json", default=None, help="also write the figures to this JSON file")
    args = parser.parse_args(argv)

    from legion.model.tokenizer import build_tiny_tokenizer

    torch.set_num_threads(args.torch_threads)
    tokenizer = build_tiny_tokenizer(caption_corpus())
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        make_jpeg_dataset(root, args.num_images)
        for sam_size in args.sam_sizes:
            dataset = SynthScarsDataset(
                root, "train", tokenizer, clip_size=336, sam_input_size=sam_size, sam_pad_to=1024
            )
            cpu_ms = cpu_ms_per_sample(dataset, min(args.samples, 40))
            results.append(
                {
                    "sam_input_size": sam_size,
                    "workers": 0,
                    "cpu_ms_per_sample": round(cpu_ms, 1),
                    "ideal_samples_per_s_per_core": round(1000 / cpu_ms, 1),
                }
            )
            print(
                f"SAM {sam_size:4d}  in-process CPU {cpu_ms:5.1f} ms/sample -> {1000 / cpu_ms:5.1f} samples/s "
                "per fully available core",
                flush=True,
            )
            for workers in args.workers:
                rate = measure(dataset, workers, args.samples)
                results.append(
                    {
                        "sam_input_size": sam_size,
                        "workers": workers,
                        "samples_per_s": round(rate, 2),
                        "samples_per_s_per_worker": round(rate / workers, 2),
                    }
                )
                print(
                    f"SAM {sam_size:4d}  workers {workers}  {rate:6.1f} samples/s  ({rate / workers:5.1f} per worker)",
                    flush=True,
                )
    info = {
        "results": results,
        "cpu_count": os.cpu_count(),
        "load_average_1min": os.getloadavg()[0],
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "image": "1024x1024 JPEG q90, 2 refs",
        "batch_size": 2,
        "clip_size": 336,
        "sam_pad_to": 1024,
        "torch_threads_per_worker": args.torch_threads,
    }
    if args.json:
        atomic_write_text(args.json, json.dumps(info, indent=1))
    print(json.dumps({k: v for k, v in info.items() if k != "results"}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
