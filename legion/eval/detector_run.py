"""Evaluate the real/fake detector (`legion cls-eval`; docs/metrics.md §6).

    legion cls-eval --config configs/legion_7b/eval_cls.yaml detector_path=runs/detector data.test=data/ufd/test

Runs the detector over a UniversalFakeDetect / CNNDetection test folder (or a reference JSON
list), writes one prediction per image, and computes the metrics from those predictions with
`legion.eval.detection.detection_metrics` (per-subset accuracy, their unweighted mean, AP with
fake = positive, real and fake accuracy). Outputs in `output_dir`:

    predictions.jsonl   {"image", "subset", "is_fake", "fake_prob", "pred_is_fake", "error"} per image
                        (fake_prob = softmax[:, 0] under the reference mapping 0 = fake, 1 = real)
    metrics.json        what detection_metrics returned, plus counts and the config
    config.yaml         the resolved config

`legion eval` can recompute the metrics from predictions.jsonl alone.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

import torch

from legion.config import ConfigError, add_config_arguments, load_config, save_resolved_config, to_dict
from legion.data.detection import list_detection_images, summarize
from legion.errors import DataError, require_path
from legion.utils.io import atomic_write_json, atomic_write_jsonl
from legion.utils.run_info import recorded

if TYPE_CHECKING:
    from legion.data.perturb import Perturbation


@dataclass
class DetectorEvalDataConfig:
    test: str = field(default="", metadata={"help": "test folder (<subset>/[<class>/]0_real|1_fake) or JSON list"})
    data_base: str | None = field(default=None, metadata={"help": "root of the JSON list's relative paths"})
    subsets: list[str] | None = field(default=None, metadata={"help": "evaluate only these subsets"})
    allow_absolute_paths: bool = False


@dataclass
class DetectorEvalConfig:
    detector_path: str = field(default="", metadata={"help": "detector checkpoint dir (written by cls-train)"})
    detector_backbone: str | None = field(
        default=None, metadata={"help": "LEGION or CLIP dir overriding the one recorded in detector.json"}
    )
    output_dir: str = "runs/detector_eval"
    batch_size: int = 64
    num_workers: int = 4
    device: str = "auto"
    dtype: str = field(
        default="auto", metadata={"help": "CLIP dtype: auto (bf16 on GPU, fp32 on CPU) | float32 | bfloat16"}
    )
    perturbation: str | None = field(
        default=None, metadata={"help": "e.g. jpeg:50, noise:5, blur:5 (applied to RGB before preprocessing)"}
    )
    seed: int = field(default=0, metadata={"help": "seed of the noise perturbation"})
    feature_cache_dir: str | None = field(default=None, metadata={"help": "reuse CLS features across runs"})
    data: DetectorEvalDataConfig = field(default_factory=DetectorEvalDataConfig)

    # named as in `legion infer`; the old names are accepted until the next release (legion.config)
    RENAMED: ClassVar[dict] = {"detector": ("detector_path", None), "backbone": ("detector_backbone", None)}


def check_detector_eval_config(cfg: DetectorEvalConfig) -> None:
    """Settings that need no model or data, checked before anything is loaded or written (ConfigError)."""
    from legion.data.perturb import parse_perturbation
    from legion.utils.devices import DTYPES, resolve_device

    if cfg.batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {cfg.batch_size}")
    if cfg.num_workers < 0:
        raise ConfigError(f"num_workers must be >= 0, got {cfg.num_workers}")
    if cfg.dtype not in ("auto", *DTYPES):
        raise ConfigError(f"dtype must be one of auto, {', '.join(DTYPES)}, got {cfg.dtype!r}")
    try:
        parse_perturbation(cfg.perturbation, seed=cfg.seed)
    except ValueError as exc:
        raise ConfigError(f"perturbation: {exc}") from None
    resolve_device(cfg.device)
    if not cfg.detector_path:
        raise ConfigError("detector_path is required (a checkpoint dir written by `legion cls-train`)")
    if not cfg.data.test:
        raise ConfigError("data.test is required (a detection folder or a JSON list)")


def predict(
    detector, items, cfg: DetectorEvalConfig, perturbation: Perturbation | None, progress: bool = True
) -> list[dict]:
    """One prediction record per item (unreadable images get fake_prob None and an error); `perturbation`
    (None: none) is applied to each image before preprocessing."""
    from legion.train.detector import FeatureCache, extract_features

    signature = "" if perturbation is None else json.dumps(perturbation.describe(), sort_keys=True)
    cache = FeatureCache(cfg.feature_cache_dir) if cfg.feature_cache_dir else None
    fs = extract_features(
        detector,
        items,
        cache,
        cfg.batch_size,
        cfg.num_workers,
        desc="detect",
        image_transform=perturbation,
        transform_signature=signature,
        progress=progress,
    )
    with torch.no_grad():
        probs = (
            detector.fake_probability_from_logits(detector.head_logits(fs.features)).cpu().tolist()
            if fs.features.shape[0]
            else []
        )
    by_path = {it.path: p for it, p in zip(fs.items, probs)}
    errors = dict(fs.unreadable)
    records = []
    for it in items:
        p = by_path.get(it.path)
        records.append(
            {
                "image": it.path,
                "subset": it.subset,
                "is_fake": it.is_fake,
                "fake_prob": p,
                "pred_is_fake": None if p is None else p >= 0.5,
                "error": errors.get(it.path),
            }
        )
    return records


TABLE_COLUMNS = (
    ("accuracy", "acc"),
    ("ap", "AP"),
    ("real_accuracy", "real acc"),
    ("fake_accuracy", "fake acc"),
    ("num_images", "images"),
)


def format_table(metrics: dict) -> str:
    """Per-subset rows, their unweighted mean and the pooled numbers (values 0-100, as detection_metrics)."""
    per = metrics.get("per_subset") or {}
    overall = metrics.get("overall") or {}
    mean_row = {
        "accuracy": metrics.get("mean_accuracy"),
        "ap": metrics.get("mean_ap"),
        "real_accuracy": metrics.get("mean_real_accuracy"),
        "fake_accuracy": metrics.get("mean_fake_accuracy"),
        "num_images": sum(v.get("num_images", 0) for v in per.values()),
    }
    rows = list(per.items()) + [("mean (unweighted)", mean_row), ("overall (pooled)", overall)]
    width = max(len(name) for name, _ in rows)

    def cell(x) -> str:
        if x is None:
            return f"{'-':>9}"
        return f"{x:>9.2f}" if isinstance(x, float) else f"{x:>9}"

    lines = [f"{'subset':<{width}}  " + "  ".join(f"{title:>9}" for _, title in TABLE_COLUMNS)]
    for i, (name, vals) in enumerate(rows):
        if i == len(per):
            lines.append("-" * len(lines[0]))
        lines.append(f"{name:<{width}}  " + "  ".join(cell(vals.get(key)) for key, _ in TABLE_COLUMNS))
    for column, group in (metrics.get("groups") or {}).items():
        lines.append(
            f"group {column}: accuracy {cell(group.get('accuracy')).strip()} over {', '.join(group['subsets'])}"
        )
    return "\n".join(lines)


@recorded("cls-eval", lambda cfg, *args, **kwargs: cfg.output_dir)
def evaluate_detector(cfg: DetectorEvalConfig, progress: bool = True) -> dict:
    """Run the detector, write predictions.jsonl and metrics.json; return the metrics."""
    from legion.data.perturb import parse_perturbation
    from legion.eval.detection import detection_metrics
    from legion.model.detector import load_detector
    from legion.utils.devices import resolve_device, resolve_dtype

    check_detector_eval_config(cfg)
    perturbation = parse_perturbation(cfg.perturbation, seed=cfg.seed) if cfg.perturbation else None
    out = Path(cfg.output_dir)
    save_resolved_config(cfg, out)
    device = resolve_device(cfg.device)
    items = list_detection_images(cfg.data.test, cfg.data.data_base, cfg.data.subsets, cfg.data.allow_absolute_paths)
    detector = load_detector(
        cfg.detector_path, device=device, dtype=resolve_dtype(cfg.dtype, device), backbone=cfg.detector_backbone
    )
    t0 = time.time()
    records = predict(detector, items, cfg, perturbation, progress=progress)
    seconds = time.time() - t0
    atomic_write_jsonl(out / "predictions.jsonl", records)
    scored = [r for r in records if r["fake_prob"] is not None]
    if not scored:
        raise DataError(f"{cfg.data.test}: no readable images")
    metrics = detection_metrics(scored)
    summary = {
        "metrics": metrics,
        "perturbation": None if perturbation is None else perturbation.describe(),
        "n_images": len(records),
        "n_unreadable": len(records) - len(scored),
        "counts": summarize(items),
        "seconds": round(seconds, 3),
        "config": to_dict(cfg),
    }
    atomic_write_json(out / "metrics.json", summary, default=float)
    return summary


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(
        parser,
        DetectorEvalConfig,
        "YAML config (e.g. configs/legion_7b/eval_cls.yaml)",
        "detector_path=runs/detector data.test=data/ufd/test",
    )
    parser.add_argument("--no-progress", action="store_true", help="no tqdm bar")


def run(args: argparse.Namespace) -> int:
    cfg = load_config(DetectorEvalConfig, args.config, args.overrides)
    check_detector_eval_config(cfg)  # before run_info.json or any loading
    for key, value in (
        ("detector_path", cfg.detector_path),
        ("data.test", cfg.data.test),
        ("detector_backbone", cfg.detector_backbone),
    ):
        if value:  # detector_backbone is optional
            require_path(value, key)
    summary = evaluate_detector(cfg, progress=not args.no_progress)
    print(format_table(summary["metrics"]))
    if summary["n_unreadable"]:
        print(f"warning: {summary['n_unreadable']} unreadable images left out (see predictions.jsonl)")
    print(f"predictions and metrics written to {cfg.output_dir}")
    return 0
