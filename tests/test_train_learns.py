"""Proof that the loc/exp recipe learns: tiny preset on ToyScars, CPU, through the real inference path.

Full-size figures (400 train images, 24 epochs, `configs/tiny/train_loc_exp.yaml`) are in
docs/training.md. This CI version trains on fewer images for fewer steps and checks the
explanation text and the masks on held-out test images with looser thresholds.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# Measured with this short run (seed-0 tiny model, 12 epochs = 192 steps): fg IoU 43.7, every answer with its one
# [SEG]. With the reference tokenization 8 epochs were too few: the 2-layer LLM still looped
# ("</p> [SEG] :The area ... </p> [SEG]"), fg IoU 15.6 (33.5 with the old tokenization at 8 epochs).
FG_IOU_FLOOR = 20.0


def _run(args, **kwargs):
    env = dict(os.environ, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", HF_HUB_OFFLINE="1")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    subprocess.run(
        [sys.executable, "-m", "legion.cli", *map(str, args)],
        env=env,
        cwd=REPO,
        check=True,
        stdout=subprocess.DEVNULL,
        timeout=900,
        **kwargs,
    )


@pytest.mark.slow
def test_tiny_training_learns_explanations(tiny_model_dir, tmp_path):
    from legion.data.toy import make_toy_data

    data = tmp_path / "toy"
    make_toy_data(data, num_train=136, num_test=16, seed=1, size=128)
    run = tmp_path / "run"
    _run(
        [
            "train",
            "--config",
            REPO / "configs/tiny/train_loc_exp.yaml",
            f"model.path={tiny_model_dir}",
            f"data.root={data}",
            f"output_dir={run}",
            "data.val_size=8",
            "schedule.epochs=12",
            "validation.every_steps=1000",
            "checkpoint.every_steps=1000",
            "logging.progress=false",
        ]
    )
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    train = [r for r in log if r["event"] == "train"]
    assert len(train) == 12 * 16 and train[-1]["ce_loss"] < 0.5 * train[0]["ce_loss"]

    _run(
        [
            "infer",
            "--config",
            REPO / "configs/tiny/infer.yaml",
            f"model_path={run / 'final_model'}",
            f"image_dir={data / 'test' / 'images'}",
            f"output_dir={run / 'infer'}",
            "max_new_tokens=160",
            "save_reference_layout=false",
            "save_phrase_masks=false",
            "save_overlay=false",
        ]
    )
    _run(
        [
            "eval",
            "explanation",
            "--pred",
            run / "infer" / "predictions.jsonl",
            "--gt",
            data,
            "--dataset",
            "synthscars",
            "--output-dir",
            run / "eval_exp",
        ]
    )
    metrics = json.loads((run / "eval_exp" / "metrics.json").read_text())["overall"]
    assert metrics["num_images"] == 16 and metrics["num_missing"] == 0
    assert metrics["rouge_l"] >= 45.0, metrics  # full run: 74.1 on 100 test images

    _run(
        [
            "eval",
            "localization",
            "--pred",
            run / "infer" / "predictions.jsonl",
            "--gt",
            data,
            "--dataset",
            "synthscars",
            "--output-dir",
            run / "eval_loc",
            "--no-plots",
        ]
    )
    loc = json.loads((run / "eval_loc" / "metrics.json").read_text())["overall"]
    print("tiny learning check:", {k: loc[k] for k in ("fg_iou", "f1", "miou")}, "rouge_l", metrics["rouge_l"])
    assert loc["num_images"] == 16
    assert loc["fg_iou"] >= FG_IOU_FLOOR, loc  # full run: 56.7 on 100 test images
