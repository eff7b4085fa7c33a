"""Train the real/fake detector head (`legion cls-train`; docs/model.md §14).

    legion cls-train --config configs/legion_7b/train_cls.yaml [key=value ...]

The paper's recipe: frozen CLIP (penultimate-layer CLS token) + a 2-layer MLP head, cross-entropy
over 2 logits (reference mapping: index 0 = fake, 1 = real), AdamW lr 1e-3 betas (0.9, 0.95),
weight decay 0, cosine schedule without warmup, 3 epochs, batch 64; the epoch with the best
validation accuracy is kept. Data: UniversalFakeDetect / CNNDetection folders
(`<subset>/[<class>/]0_real|1_fake`) or the reference JSON lists (legion.data.detection).

Because the backbone is frozen and there is no augmentation, every image's CLS feature is fixed:
the recipe extracts all features once (first pass over the images, tqdm), keeps them in memory,
and optionally on disk (`feature_cache_dir`, keyed by image path + mtime + size + preprocessing +
backbone fingerprint) so a rerun skips CLIP entirely. The epochs then only run the head.

On the tiny preset the CLIP tower is random: its penultimate CLS token is close to a global
colour average (near-uniform attention), so local artifacts such as ToyScars' blurred / noisy /
tinted patches barely move it. Measured on ToyScars, the head reaches ~56% test accuracy and a
logistic-regression probe on the same features ~54-58%: the tiny run exercises the pipeline, the
detection quality comes from a pretrained CLIP.

Outputs in `output_dir`: the best detector checkpoint (head.safetensors + detector.json, which
references the CLIP backbone instead of copying it), `config.yaml` (resolved), `log.jsonl`,
`metrics.json`.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from legion.config import ConfigError, add_config_arguments, load_config, save_resolved_config, to_dict
from legion.data.detection import DetectionItem, is_fake_to_reference_index, list_detection_images, summarize
from legion.errors import DataError, require_path
from legion.utils.devices import resolve_device, resolve_dtype
from legion.utils.io import atomic_path, atomic_write_json, atomic_write_text
from legion.utils.run_info import recorded

# --- config ------------------------------------------------------------------------------------


@dataclass
class DetectorDataConfig:
    train: str = field(default="", metadata={"help": "training folder (<subset>/[<class>/]0_real|1_fake) or JSON list"})
    train_data_base: str | None = field(default=None, metadata={"help": "root of the JSON list's relative paths"})
    val: str | None = field(default=None, metadata={"help": "validation folder / JSON list; empty: split from train"})
    val_data_base: str | None = None
    val_fraction: float = field(default=0.1, metadata={"help": "held-out fraction of train when `val` is empty"})
    subsets: list[str] | None = field(default=None, metadata={"help": "keep only these subsets of train"})
    allow_absolute_paths: bool = field(default=False, metadata={"help": "accept absolute paths in JSON lists"})


@dataclass
class DetectorModelConfig:
    backbone: str = field(default="", metadata={"help": "merged LEGION checkpoint dir or a CLIP dir"})
    vision_tower: str | None = field(default=None, metadata={"help": "CLIP dir overriding config.mm_vision_tower"})
    dtype: str = field(
        default="auto", metadata={"help": "CLIP dtype: auto (bf16 on GPU, fp32 on CPU) | float32 | bfloat16"}
    )
    head_dtype: str = field(
        default="bfloat16",
        metadata={
            "help": "dtype of the trainable head while it trains: bfloat16 = the reference (its model, head included, "
            "was loaded in bf16 and trained under the HF Trainer's bf16); float32. Saved as fp32 either way"
        },
    )


@dataclass
class DetectorOptimConfig:
    lr: float = 1e-3
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    weight_decay: float = 0.0
    scheduler: str = field(default="cosine", metadata={"help": "cosine | constant"})
    warmup_steps: int = 0


@dataclass
class DetectorTrainConfig:
    output_dir: str = "runs/detector"
    epochs: int = 3
    batch_size: int = field(
        default=64, metadata={"help": "head-training batch (global: one process). The reference: 64 per GPU"}
    )
    extract_batch_size: int = field(default=64, metadata={"help": "images per CLIP forward in the feature pass"})
    num_workers: int = field(default=4, metadata={"help": "image decoding workers of the feature pass"})
    seed: int = 0
    device: str = field(default="auto", metadata={"help": "auto | cpu | cuda | cuda:N"})
    feature_cache_dir: str | None = field(
        default=None, metadata={"help": "persist CLS features here (reused across runs)"}
    )
    log_every: int = 20
    skip_unreadable: bool = field(default=True, metadata={"help": "skip (and count) images that fail to decode"})
    data: DetectorDataConfig = field(default_factory=DetectorDataConfig)
    model: DetectorModelConfig = field(default_factory=DetectorModelConfig)
    optim: DetectorOptimConfig = field(default_factory=DetectorOptimConfig)


def check_detector_train_config(cfg: DetectorTrainConfig) -> None:
    """Every setting that needs no model or data, checked before anything is loaded or written (ConfigError)."""
    import math

    from legion.utils.devices import DTYPES

    def need(ok: bool, key: str, rule: str, value) -> None:
        if not ok:
            raise ConfigError(f"{key} must be {rule}, got {value!r}")

    def number(value) -> bool:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)

    for key in ("epochs", "batch_size", "extract_batch_size", "log_every"):
        need(getattr(cfg, key) >= 1, key, ">= 1", getattr(cfg, key))
    need(cfg.num_workers >= 0, "num_workers", ">= 0", cfg.num_workers)
    o = cfg.optim
    need(number(o.lr) and o.lr > 0, "optim.lr", "> 0", o.lr)
    betas = list(o.betas)
    need(len(betas) == 2 and all(number(b) and 0 <= b < 1 for b in betas), "optim.betas", "2 numbers in [0, 1)", betas)
    need(number(o.weight_decay) and o.weight_decay >= 0, "optim.weight_decay", ">= 0", o.weight_decay)
    need(o.scheduler in ("cosine", "constant"), "optim.scheduler", "cosine or constant", o.scheduler)
    need(o.warmup_steps >= 0, "optim.warmup_steps", ">= 0", o.warmup_steps)
    fraction = cfg.data.val_fraction
    need(number(fraction) and 0 <= fraction < 1, "data.val_fraction", "in [0, 1)", fraction)
    need(
        cfg.model.head_dtype in ("bfloat16", "float32"), "model.head_dtype", "bfloat16 or float32", cfg.model.head_dtype
    )
    dtypes = ("auto", *DTYPES)
    need(cfg.model.dtype in dtypes, "model.dtype", " | ".join(dtypes), cfg.model.dtype)
    resolve_device(cfg.device)


# --- feature cache --------------------------------------------------------------------------


def image_cache_key(path: str, signature: str) -> str:
    """Key of one image's feature: absolute path + mtime + size + everything that shapes the pixels."""
    st = os.stat(path)
    raw = f"{Path(path).resolve()}|{st.st_mtime_ns}|{st.st_size}|{signature}"
    return hashlib.sha1(raw.encode()).hexdigest()


class FeatureCache:
    """key -> float32 feature [d]; in memory, and in `directory` (safetensors shards) when given.

    Disk layout: `shard_NNNNN.safetensors` ({"features": [n, d]}) + `shard_NNNNN.keys.json` (n keys);
    a shard counts only once its keys file exists, so an interrupted write is simply ignored.
    """

    def __init__(self, directory: str | os.PathLike | None = None, shard_size: int = 8192):
        self.directory = Path(directory) if directory else None
        self.shard_size = shard_size
        self._memory: dict[str, torch.Tensor] = {}
        self._pending: dict[str, torch.Tensor] = {}
        if self.directory is not None:
            self.directory.mkdir(parents=True, exist_ok=True)
            for keys_file in sorted(self.directory.glob("shard_*.keys.json")):
                shard = keys_file.with_name(keys_file.name.replace(".keys.json", ".safetensors"))
                if not shard.is_file():
                    continue
                keys = json.loads(keys_file.read_text())
                feats = load_file(str(shard))["features"]
                if len(keys) != feats.shape[0]:
                    continue  # a damaged shard is recomputed, never trusted
                self._memory.update(zip(keys, feats.unbind(0)))

    def __len__(self) -> int:
        return len(self._memory)

    def get(self, key: str) -> torch.Tensor | None:
        return self._memory.get(key)

    def put(self, key: str, feature: torch.Tensor) -> None:
        feature = feature.detach().float().cpu().clone()
        self._memory[key] = feature
        if self.directory is not None:
            self._pending[key] = feature
            if len(self._pending) >= self.shard_size:
                self.flush()

    def flush(self) -> None:
        if self.directory is None or not self._pending:
            return
        index = len(list(self.directory.glob("shard_*.keys.json")))
        while (self.directory / f"shard_{index:05d}.keys.json").exists():
            index += 1
        stem = self.directory / f"shard_{index:05d}"
        keys = list(self._pending)
        with atomic_path(stem.with_suffix(".safetensors")) as tmp:
            save_file({"features": torch.stack([self._pending[k] for k in keys])}, str(tmp))
        atomic_write_text(stem.with_suffix(".keys.json"), json.dumps(keys))
        self._pending.clear()


# --- feature extraction ---------------------------------------------------------------------


class _ImageDataset(Dataset):
    """Items -> (index, pixels [3, S, S]) or (index, None, reason) for unreadable images."""

    def __init__(
        self,
        paths: Sequence[str],
        preprocess: Callable[[np.ndarray], torch.Tensor],
        image_transform: Callable[[np.ndarray], np.ndarray] | None = None,
    ):
        self.paths, self.preprocess, self.image_transform = list(paths), preprocess, image_transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        from legion.data.images import ImageReadError, read_image

        try:
            image = read_image(self.paths[i])
        except ImageReadError as exc:
            return i, None, exc.reason
        if self.image_transform is not None:
            image = self.image_transform(image)
        return i, self.preprocess(image), None


def _collate(batch):
    good = [(i, px) for i, px, _ in batch if px is not None]
    bad = [(i, reason) for i, px, reason in batch if px is None]
    idx = torch.tensor([i for i, _ in good], dtype=torch.long)
    pixels = torch.stack([px for _, px in good]) if good else None
    return idx, pixels, bad


@dataclass
class FeatureSet:
    features: torch.Tensor  # float32 [N_ok, d], rows of the readable items, in item order
    items: list[DetectionItem]  # the readable items, aligned with `features`
    unreadable: list[tuple[str, str]]  # (path, reason)
    computed: int  # how many came from CLIP (the rest from the cache)


def extract_features(
    detector,
    items: Sequence[DetectionItem],
    cache: FeatureCache | None = None,
    batch_size: int = 64,
    num_workers: int = 0,
    desc: str = "features",
    image_transform: Callable[[np.ndarray], np.ndarray] | None = None,
    transform_signature: str = "",
    progress: bool = True,
) -> FeatureSet:
    """CLS features of `items` through the detector's frozen CLIP, reusing `cache` where it can.

    The cache key covers the image file (path, mtime, size), the preprocessing, any image
    transform (e.g. a perturbation; pass its `transform_signature`), the backbone fingerprint and
    the feature layer, so a stale entry is never reused.
    """
    from legion.model.detector import backbone_fingerprint

    signature = "|".join(
        [
            detector.preprocess_spec.signature(),
            f"transform={transform_signature}",
            f"backbone={backbone_fingerprint(detector.vision_tower)}",
            f"layer={detector.feature_layer}",
            "token=cls",
        ]
    )
    feats: list[torch.Tensor | None] = [None] * len(items)
    keys: list[str | None] = [None] * len(items)
    unreadable: dict[int, str] = {}
    todo = []
    for i, item in enumerate(items):
        try:
            keys[i] = image_cache_key(item.path, signature)
        except OSError:
            unreadable[i] = "missing"
            continue
        hit = cache.get(keys[i]) if cache is not None else None
        if hit is not None:
            feats[i] = hit
        else:
            todo.append(i)
    if todo:
        dataset = _ImageDataset([items[i].path for i in todo], detector.preprocess, image_transform)
        loader = DataLoader(
            dataset,
            batch_size=batch_size,
            shuffle=False,
            num_workers=num_workers,
            collate_fn=_collate,
            persistent_workers=False,
        )
        bar = tqdm(loader, desc=desc, unit="batch", disable=not progress, dynamic_ncols=True)
        for local_idx, pixels, bad in bar:
            for j, reason in bad:
                unreadable[todo[j]] = reason
            if pixels is None:
                continue
            out = detector.features(pixels).cpu()
            for j, row in zip(local_idx.tolist(), out):
                i = todo[j]
                feats[i] = row.clone()
                if cache is not None:
                    cache.put(keys[i], row)
        if cache is not None:
            cache.flush()
    ok = [i for i in range(len(items)) if feats[i] is not None]
    d = detector.hidden_size
    stacked = torch.stack([feats[i] for i in ok]) if ok else torch.zeros(0, d)
    return FeatureSet(
        stacked,
        [items[i] for i in ok],
        [(items[i].path, r) for i, r in sorted(unreadable.items())],
        computed=len(todo) - sum(1 for i in todo if i in unreadable),
    )


# --- data splits ------------------------------------------------------------------------------


def stratified_split(
    items: Sequence[DetectionItem], fraction: float, seed: int
) -> tuple[list[DetectionItem], list[DetectionItem]]:
    """(train, val): `fraction` of each (subset, is_fake) group, at least one item per non-tiny group."""
    if not 0.0 < fraction < 1.0:
        raise ConfigError(f"data.val_fraction must be in (0, 1) when data.val is empty, got {fraction}")
    groups: dict[tuple[str, bool], list[int]] = {}
    for i, it in enumerate(items):
        groups.setdefault((it.subset, it.is_fake), []).append(i)
    rng = random.Random(seed)
    val_idx: set[int] = set()
    for key in sorted(groups, key=lambda k: (k[0], k[1])):
        idx = groups[key][:]
        rng.shuffle(idx)
        n_val = min(len(idx) - 1, max(1, round(fraction * len(idx)))) if len(idx) > 1 else 0
        val_idx.update(idx[:n_val])
    train = [it for i, it in enumerate(items) if i not in val_idx]
    val = [it for i, it in enumerate(items) if i in val_idx]
    return train, val


def reference_targets(items: Sequence[DetectionItem]) -> torch.Tensor:
    """Cross-entropy targets in the reference mapping (0 = fake, 1 = real)."""
    return torch.tensor([is_fake_to_reference_index(it.is_fake) for it in items], dtype=torch.long)


# --- head training ----------------------------------------------------------------------------


def make_scheduler(optimizer, kind: str, warmup_steps: int, total_steps: int):
    from transformers import get_constant_schedule_with_warmup, get_cosine_schedule_with_warmup

    if kind == "cosine":
        return get_cosine_schedule_with_warmup(optimizer, warmup_steps, total_steps)
    if kind == "constant":
        return get_constant_schedule_with_warmup(optimizer, warmup_steps)
    raise ConfigError(f"optim.scheduler: unknown {kind!r} (cosine, constant)")


@torch.no_grad()
def evaluate_head(detector, features: torch.Tensor, targets: torch.Tensor, batch_size: int = 1024) -> dict:
    """Overall accuracy and mean CE loss of the head on cached features (the Trainer's metric)."""
    was_training = detector.training
    detector.eval()
    correct, loss_sum = 0, 0.0
    for start in range(0, features.shape[0], batch_size):
        logits = detector.head_logits(features[start : start + batch_size]).float()
        y = targets[start : start + batch_size].to(logits.device)
        loss_sum += torch.nn.functional.cross_entropy(logits, y, reduction="sum").item()
        correct += (logits.argmax(-1) == y).sum().item()
    detector.train(was_training)
    n = max(1, features.shape[0])
    return {"accuracy": correct / n, "loss": loss_sum / n, "n": int(features.shape[0])}


def train_head(
    detector,
    train_x: torch.Tensor,
    train_y: torch.Tensor,
    cfg: DetectorTrainConfig,
    val_x: torch.Tensor | None = None,
    val_y: torch.Tensor | None = None,
    logger=None,
    on_best: Callable[[int, dict], None] | None = None,
) -> dict:
    """AdamW + schedule over cached features; keeps (restores) the head of the best val-accuracy epoch.

    Returns {"best_epoch", "best_val_accuracy", "history": [per-epoch dict]}.
    """
    device = detector.device
    gen = torch.Generator().manual_seed(cfg.seed)
    train_x, train_y = train_x.to(device), train_y.to(device)
    head = detector.prediction_head
    optimizer = torch.optim.AdamW(
        head.parameters(), lr=cfg.optim.lr, betas=tuple(cfg.optim.betas), weight_decay=cfg.optim.weight_decay
    )
    steps_per_epoch = math.ceil(train_x.shape[0] / cfg.batch_size)
    total = steps_per_epoch * cfg.epochs
    scheduler = make_scheduler(optimizer, cfg.optim.scheduler, cfg.optim.warmup_steps, total)
    best = {"epoch": -1, "accuracy": -1.0, "state": None}
    history = []
    step = 0
    detector.train()
    for epoch in range(1, cfg.epochs + 1):
        order = torch.randperm(train_x.shape[0], generator=gen).to(device)
        loss_sum, correct, seen, t0 = 0.0, 0, 0, time.time()
        for start in range(0, train_x.shape[0], cfg.batch_size):
            idx = order[start : start + cfg.batch_size]
            logits = detector.head_logits(train_x[idx]).float()
            loss = torch.nn.functional.cross_entropy(logits, train_y[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            step += 1
            loss_sum += loss.item() * idx.numel()
            correct += (logits.argmax(-1) == train_y[idx]).sum().item()
            seen += idx.numel()
            if logger is not None and (step % max(1, cfg.log_every) == 0 or step == total):
                logger.train_step(step, {"loss": loss.item(), "lr": scheduler.get_last_lr()[0], "epoch": epoch})
        record = {
            "epoch": epoch,
            "train_loss": loss_sum / max(1, seen),
            "train_accuracy": correct / max(1, seen),
            "seconds": round(time.time() - t0, 3),
        }
        if val_x is not None and val_x.shape[0] > 0:
            val = evaluate_head(detector, val_x, val_y)
            record.update(val_accuracy=val["accuracy"], val_loss=val["loss"])
            score = val["accuracy"]
        else:
            score = float(epoch)  # no validation data: the last epoch wins
        history.append(record)
        if logger is not None:
            logger.event("epoch", step, record)
            logger.print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in record.items()))
        if score > best["accuracy"]:  # strictly better: ties keep the earlier epoch, as HF Trainer does
            best = {
                "epoch": epoch,
                "accuracy": score,
                "state": {k: v.detach().clone() for k, v in head.state_dict().items()},
            }
            if on_best is not None:
                on_best(epoch, record)
    head.load_state_dict(best["state"])
    detector.eval()
    has_val = val_x is not None and val_x.shape[0] > 0
    return {
        "best_epoch": best["epoch"],
        "best_val_accuracy": best["accuracy"] if has_val else None,
        "history": history,
        "steps": step,
    }


# --- recipe -----------------------------------------------------------------------------------


def _load_items(cfg: DetectorTrainConfig) -> tuple[list[DetectionItem], list[DetectionItem]]:
    d = cfg.data
    if not d.train:
        raise ConfigError("data.train is required (a detection folder or a JSON list)")
    train = list_detection_images(d.train, d.train_data_base, d.subsets, d.allow_absolute_paths)
    if d.val:
        val = list_detection_images(d.val, d.val_data_base, None, d.allow_absolute_paths)
    elif d.val_fraction > 0:
        train, val = stratified_split(train, d.val_fraction, cfg.seed)
    else:
        val = []
    return train, val


@recorded("cls-train", lambda cfg, *args, **kwargs: cfg.output_dir)
def train_detector(cfg: DetectorTrainConfig, progress: bool = True) -> dict:
    """Run the whole recipe; returns the summary also written to `metrics.json`."""
    from legion.model.detector import build_detector
    from legion.train.logging import TrainLogger

    check_detector_train_config(cfg)
    if not cfg.model.backbone:
        raise ConfigError("model.backbone is required (a merged LEGION checkpoint dir or a CLIP dir)")
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    out = Path(cfg.output_dir)
    save_resolved_config(cfg, out)
    device = resolve_device(cfg.device)
    train_items, val_items = _load_items(cfg)
    detector = build_detector(
        cfg.model.backbone,
        device=device,
        dtype=resolve_dtype(cfg.model.dtype, device, "model.dtype"),
        vision_tower=cfg.model.vision_tower,
        seed=cfg.seed,
    )
    detector.prediction_head.to(getattr(torch, cfg.model.head_dtype))
    cache = FeatureCache(cfg.feature_cache_dir)
    logger = TrainLogger(
        out,
        total_steps=cfg.epochs * math.ceil(max(1, len(train_items)) / cfg.batch_size),
        progress=progress,
        config=to_dict(cfg),
    )
    logger.event("data", 0, {"train": summarize(train_items), "val": summarize(val_items)})

    def features(items, desc):
        fs = extract_features(
            detector, items, cache, cfg.extract_batch_size, cfg.num_workers, desc=desc, progress=progress
        )
        if fs.unreadable:
            msg = f"{desc}: {len(fs.unreadable)} unreadable images, e.g. {fs.unreadable[0]}"
            if not cfg.skip_unreadable:
                raise DataError(msg + " (set skip_unreadable=true to skip them)")
            logger.print("warning: " + msg + " (skipped)")
        logger.event(
            "features",
            0,
            {
                "split": desc,
                "n": len(fs.items),
                "computed": fs.computed,
                "from_cache": len(fs.items) - fs.computed,
                "unreadable": len(fs.unreadable),
            },
        )
        return fs

    t0 = time.time()
    train_fs = features(train_items, "train features")
    val_fs = features(val_items, "val features") if val_items else None
    feature_seconds = time.time() - t0
    if train_fs.features.shape[0] == 0:
        raise DataError("no readable training images")

    def save_best(epoch: int, record: dict) -> None:
        detector.save(out, extra={"epoch": epoch, **{k: v for k, v in record.items() if k != "seconds"}})

    result = train_head(
        detector,
        train_fs.features,
        reference_targets(train_fs.items),
        cfg,
        val_fs.features if val_fs else None,
        reference_targets(val_fs.items) if val_fs else None,
        logger=logger,
        on_best=save_best,
    )
    summary = {
        "best_epoch": result["best_epoch"],
        "best_val_accuracy": result["best_val_accuracy"],
        "history": result["history"],
        "steps": result["steps"],
        "n_train": len(train_fs.items),
        "n_val": len(val_fs.items) if val_fs else 0,
        "unreadable": len(train_fs.unreadable) + (len(val_fs.unreadable) if val_fs else 0),
        "feature_seconds": round(feature_seconds, 3),
        "detector_dir": str(out),
    }
    atomic_write_json(out / "metrics.json", summary)
    logger.event("done", result["steps"], {k: v for k, v in summary.items() if k != "history"})
    logger.close()
    return summary


# --- CLI --------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(
        parser,
        DetectorTrainConfig,
        "YAML config (e.g. configs/legion_7b/train_cls.yaml)",
        "data.train=data/cnndetection/progan_train epochs=1",
    )
    parser.add_argument("--no-progress", action="store_true", help="no tqdm bars (logs still go to log.jsonl)")


def run(args: argparse.Namespace) -> int:
    cfg = load_config(DetectorTrainConfig, args.config, args.overrides)
    check_detector_train_config(cfg)  # before run_info.json or any loading
    for key, value in (
        ("data.train", cfg.data.train),
        ("data.val", cfg.data.val),
        ("model.backbone", cfg.model.backbone),
        ("model.vision_tower", cfg.model.vision_tower),
    ):
        if value:  # an empty required key is reported by train_detector
            require_path(value, key)
    summary = train_detector(cfg, progress=not args.no_progress)
    best = summary["best_val_accuracy"]
    print(
        f"best epoch {summary['best_epoch']}"
        + (f", val accuracy {best:.4f}" if best is not None else "")
        + f"; detector saved to {summary['detector_dir']}"
    )
    return 0
