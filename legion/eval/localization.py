"""Artifact localization metrics from saved predictions (docs/metrics.md §1-§4).

Everything is computed from four pixel counts per image (TP, FP, FN, TN), which are obtained
on the run-length encodings directly (pycocotools ``merge``/``area``): no mask is ever decoded
to a dense array, so 1,000 images at 1024x1024 take about a second.

Protocols (all reported ×100):
  * LEGION (paper Table 2): per-image mIoU = mean(background IoU, foreground IoU), each with a
    +1e-6 in the denominator; per-image pixel F1 with F1 = 1 when both masks are empty;
    both averaged over images -> ``miou``, ``f1``.
  * foreground (ArtiAgent, audits): per-image FG IoU and FG F1 averaged (``fg_iou``, ``fg_f1``)
    and cumulative over the dataset (``global_fg_iou``, ``global_fg_f1``). What an image with
    both masks empty scores is an explicit convention (``FG_BOTH_EMPTY``), recorded in the output.
  * gIoU / cIoU (LISA / GLaMM): IoU_m = I_m / (U_m + 1e-5), 1.0 when U_m = 0; gIoU = mean over
    masks, cIoU = ΣI / ΣU. LISA scores each predicted mask against *its own* GT mask, which needs
    to know which GT artifact a predicted mask is for. ``mask_pairing`` says how:
      - "auto" (default): per mask when the image's predicted phrases are exactly its GT ref
        sentences (case/space-insensitive, e.g. teacher-forced predictions), paired by phrase;
        otherwise the image's predicted union vs its GT union (free-running output has no link
        between predicted and GT phrases);
      - "ordered": predicted mask k vs GT artifact k when the counts agree, else the union;
      - "union": always one union mask per image.
    The number of images scored per mask is recorded (``images_scored_per_mask``).
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import numpy as np

from legion.errors import DataError
from legion.eval.ground_truth import (
    GroundTruthItem,
    Matching,
    check_matching,
    check_record_masks,
    match_predictions,
)
from legion.record import PredictionRecord
from legion.utils.rle import rle_area, rle_intersection_area, rle_size, rle_union

LEGION_EPS = 1e-6  # ref-init calculate_miou
LISA_EPS = 1e-5  # LISA / GLaMM per-mask IoU

# name -> (FG IoU, FG F1) of an image whose prediction and GT are both empty; nan = left out of the mean.
FG_BOTH_EMPTY: dict[str, tuple[float, float]] = {
    "artiagent": (1.0, 0.0),  # ArtiAgent: IoU 1.0; sklearn f1_score(average='binary') -> 0.0
    "one": (1.0, 1.0),
    "zero": (0.0, 0.0),  # LEGION's logged `miou_without_background`
    "skip": (math.nan, math.nan),
}
METRIC_KEYS = ("miou", "f1", "fg_iou", "fg_f1", "global_fg_iou", "global_fg_f1", "giou", "ciou")


# --------------------------------------------------------------------------- per-image formulas
# Each takes counts as Python numbers or numpy arrays (vectorised over images).


def legion_miou(tp, fp, fn, tn):
    """mean(IoU_bg, IoU_fg), IoU_c = |P_c ∩ G_c| / (|P_c ∪ G_c| + 1e-6) (ref-init ``calculate_miou``)."""
    tp, fp, fn, tn = (np.asarray(v, dtype=np.float64) for v in (tp, fp, fn, tn))
    iou_fg = tp / (tp + fp + fn + LEGION_EPS)
    iou_bg = tn / (tn + fp + fn + LEGION_EPS)
    return (iou_fg + iou_bg) / 2


def legion_f1(tp, fp, fn):
    """Pixel F1; 1.0 when TP = FP = FN = 0, 0 when TP = 0 otherwise (ref-init ``calculate_f1``).

    With TP > 0 this equals 2TP / (2TP + FP + FN)."""
    tp, fp, fn = (np.asarray(v, dtype=np.float64) for v in (tp, fp, fn))
    denom = 2 * tp + fp + fn
    with np.errstate(invalid="ignore", divide="ignore"):
        f1 = np.where(denom > 0, 2 * tp / np.where(denom > 0, denom, 1), 1.0)
    return f1


def fg_iou(tp, fp, fn, both_empty: float):
    """TP / (TP + FP + FN); ``both_empty`` when the union is empty."""
    tp, fp, fn = (np.asarray(v, dtype=np.float64) for v in (tp, fp, fn))
    union = tp + fp + fn
    return np.where(union > 0, tp / np.where(union > 0, union, 1), both_empty)


def fg_f1(tp, fp, fn, both_empty: float):
    """2TP / (2TP + FP + FN); ``both_empty`` when both masks are empty."""
    tp, fp, fn = (np.asarray(v, dtype=np.float64) for v in (tp, fp, fn))
    denom = 2 * tp + fp + fn
    return np.where(denom > 0, 2 * tp / np.where(denom > 0, denom, 1), both_empty)


def lisa_mask_iou(intersection, union):
    """IoU_m = I / (U + 1e-5), and 1.0 for an empty union (LISA's "no-object" target)."""
    i, u = np.asarray(intersection, dtype=np.float64), np.asarray(union, dtype=np.float64)
    return np.where(u > 0, i / (u + LISA_EPS), 1.0)


def pixel_counts(pred: np.ndarray | None, gt: np.ndarray) -> tuple[int, int, int, int]:
    """(TP, FP, FN, TN) of dense binary masks ``[H, W]``; ``pred=None`` = empty prediction."""
    gt = np.asarray(gt)
    if gt.ndim != 2:
        raise ValueError(f"masks must be [H, W], got {gt.shape}")
    g = gt != 0
    if pred is None:
        tp = fp = 0
    else:
        pred = np.asarray(pred)
        if pred.shape != gt.shape:
            raise ValueError(f"prediction shape {pred.shape} != ground-truth shape {gt.shape}")
        p = pred != 0
        tp = int(np.count_nonzero(p & g))
        fp = int(np.count_nonzero(p)) - tp
    fn = int(np.count_nonzero(g)) - tp
    tn = g.size - tp - fp - fn
    return tp, fp, fn, tn


# --------------------------------------------------------------------------- per image


def prediction_rle(record: PredictionRecord | None, size: tuple[int, int]) -> dict | None:
    """The predicted union mask as RLE, or None for an empty prediction.

    Empty: no record, verdict "real" or "error", or neither masks nor a union. ``union_mask`` is
    used when present, else the union of ``masks``. A mask whose size differs from the image raises."""
    if record is None or record.verdict in ("real", "error"):
        return None
    union = record.union_mask
    if union is None:
        if not record.masks:
            return None
        union = rle_union(record.masks)
    if rle_size(union) != tuple(size):
        raise DataError(f"{record.image}: predicted mask size {list(rle_size(union))} != image size {list(size)}")
    return union


@dataclass
class ImageScore:
    """Counts and scores of one image. ``mask_pairs`` = (I, U) per scored mask for gIoU/cIoU."""

    name: str
    tp: int
    fp: int
    fn: int
    tn: int
    missing: bool = False
    error: bool = False
    pairing: str = "union"
    mask_pairs: list[tuple[int, int]] = field(default_factory=list)
    content_type: str | None = None
    artifact_category: str | list[str] | None = None

    def as_row(self, both_empty: str) -> dict:
        iou0, f10 = FG_BOTH_EMPTY[both_empty]
        row = {
            "image": self.name,
            "missing": self.missing,
            "error": self.error,
            "tp": self.tp,
            "fp": self.fp,
            "fn": self.fn,
            "tn": self.tn,
            "gt_area": self.tp + self.fn,
            "pred_area": self.tp + self.fp,
            "miou": float(legion_miou(self.tp, self.fp, self.fn, self.tn)),
            "f1": float(legion_f1(self.tp, self.fp, self.fn)),
            "fg_iou": _json_float(fg_iou(self.tp, self.fp, self.fn, iou0)),
            "fg_f1": _json_float(fg_f1(self.tp, self.fp, self.fn, f10)),
            "mask_ious": [float(lisa_mask_iou(i, u)) for i, u in self.mask_pairs],
            "pairing": self.pairing,
        }
        if self.content_type is not None:
            row["content_type"] = self.content_type
        if self.artifact_category is not None:
            row["artifact_category"] = self.artifact_category
        return row


def _json_float(x) -> float | None:
    x = float(x)
    return None if math.isnan(x) else x


def score_image(gt: GroundTruthItem, record: PredictionRecord | None, mask_pairing: str = "auto") -> ImageScore:
    """Counts of one image from RLEs (no dense decoding)."""
    fallback = None
    if record is not None and record.height and record.width:
        fallback = (int(record.height), int(record.width))
    size = gt.resolved_size(fallback)
    gt_rle = gt.mask_rle(size)
    pred = prediction_rle(record, size)
    g = rle_area(gt_rle)
    if pred is None:
        tp = p = 0
    else:
        p = rle_area(pred)
        tp = rle_intersection_area(pred, gt_rle) if p and g else 0
    fp, fn = p - tp, g - tp
    tn = size[0] * size[1] - tp - fp - fn
    score = ImageScore(
        name=gt.name,
        tp=tp,
        fp=fp,
        fn=fn,
        tn=tn,
        missing=record is None,
        error=record is not None and record.verdict == "error",
        mask_pairs=[(tp, tp + fp + fn)],
        content_type=gt.content_type,
        artifact_category=gt.artifact_category,
    )
    if mask_pairing not in MASK_PAIRINGS:
        raise ValueError(f"mask_pairing must be one of {MASK_PAIRINGS}, got {mask_pairing!r}")
    if mask_pairing != "union" and pred is not None:
        order = _pair_order(gt, record, mask_pairing)
        if order is not None:
            pred_masks, gt_masks = record.masks, gt.phrase_rles(size)
            pairs = []
            for k, j in enumerate(order):
                pm, gm = pred_masks[k], gt_masks[j]
                if rle_size(pm) != tuple(size):
                    raise DataError(f"{gt.name}: predicted mask size {list(rle_size(pm))} != image size {list(size)}")
                inter = rle_intersection_area(pm, gm)
                pairs.append((inter, rle_area(pm) + rle_area(gm) - inter))
            score.mask_pairs, score.pairing = pairs, "per_mask"
    return score


MASK_PAIRINGS = ("auto", "ordered", "union")


def _norm_phrase(text) -> str:
    return " ".join(str(text).lower().split())


def _pair_order(gt: GroundTruthItem, record: PredictionRecord, mask_pairing: str) -> list[int] | None:
    """For predicted mask k, the index of its GT artifact; None = score the image as a union."""
    pred_masks = record.masks or []
    n = len(pred_masks)
    if gt.phrase_polygons is None or n == 0 or n != len(gt.phrase_polygons):
        return None
    if mask_pairing == "ordered":
        return list(range(n))
    phrases, sentences = record.phrases or [], gt.phrase_texts or []
    if len(phrases) != n or len(sentences) != n:
        return None
    free: dict[str, list[int]] = {}
    for j, sentence in enumerate(sentences):
        free.setdefault(_norm_phrase(sentence), []).append(j)
    order = []
    for phrase in phrases:
        slots = free.get(_norm_phrase(phrase))
        if not slots:
            return None
        order.append(slots.pop(0))
    return order


def _score_star(args):
    return score_image(*args)


# --------------------------------------------------------------------------- aggregation


def summarize(scores: list[ImageScore], both_empty: str = "artiagent") -> dict:
    """Dataset-level metrics (×100) of a list of image scores."""
    if both_empty not in FG_BOTH_EMPTY:
        raise ValueError(f"unknown both-empty convention {both_empty!r}; choose one of {sorted(FG_BOTH_EMPTY)}")
    iou0, f10 = FG_BOTH_EMPTY[both_empty]
    out = {k: None for k in METRIC_KEYS}
    out.update(
        num_images=len(scores),
        num_missing=sum(s.missing for s in scores),
        num_errors=sum(s.error for s in scores),
        num_masks=sum(len(s.mask_pairs) for s in scores),
    )
    if not scores:
        return out
    tp, fp, fn, tn = (np.array([getattr(s, k) for s in scores], dtype=np.float64) for k in ("tp", "fp", "fn", "tn"))
    pairs = np.array([p for s in scores for p in s.mask_pairs], dtype=np.float64).reshape(-1, 2)

    def pct(x):
        x = float(x)
        return None if math.isnan(x) else 100.0 * x

    def nanmean(x):
        x = np.asarray(x, dtype=np.float64)
        return math.nan if np.all(np.isnan(x)) else float(np.nanmean(x))

    union_total, f1_total = (tp + fp + fn).sum(), (2 * tp + fp + fn).sum()
    out.update(
        miou=pct(legion_miou(tp, fp, fn, tn).mean()),
        f1=pct(legion_f1(tp, fp, fn).mean()),
        fg_iou=pct(nanmean(fg_iou(tp, fp, fn, iou0))),
        fg_f1=pct(nanmean(fg_f1(tp, fp, fn, f10))),
        global_fg_iou=pct(tp.sum() / union_total if union_total > 0 else iou0),
        global_fg_f1=pct(2 * tp.sum() / f1_total if f1_total > 0 else f10),
        giou=pct(lisa_mask_iou(pairs[:, 0], pairs[:, 1]).mean()) if len(pairs) else None,
        ciou=pct(pairs[:, 0].sum() / (pairs[:, 1].sum() + 1e-10)) if len(pairs) else None,
    )
    return out


def _labels(value) -> list[str]:
    if value is None:
        return []
    if isinstance(value, (list, tuple, set)):
        return sorted({str(v) for v in value if v is not None})
    return [str(value)]


def breakdown(scores: list[ImageScore], attribute: str, both_empty: str) -> dict[str, dict]:
    """``{label: summary}`` over images carrying ``attribute`` (content_type / artifact_category)."""
    groups: dict[str, list[ImageScore]] = {}
    for s in scores:
        for label in _labels(getattr(s, attribute)):
            groups.setdefault(label, []).append(s)
    return {label: summarize(group, both_empty) for label, group in sorted(groups.items())}


@dataclass
class LocalizationResult:
    metrics: dict  # what metrics.json holds
    scores: list[ImageScore]  # one per ground-truth image

    def per_image_rows(self) -> list[dict]:
        return [s.as_row(self.metrics["protocol"]["fg_both_empty"]) for s in self.scores]


def evaluate_localization(
    predictions: Iterable[Mapping],
    ground_truth: Mapping[str, GroundTruthItem],
    both_empty: str = "artiagent",
    mask_pairing: str = "auto",
    workers: int = 1,
    dataset: str | None = None,
    progress: bool = False,
    image_root: str | None = None,
    matching: Matching | None = None,
) -> LocalizationResult:
    """Score ``predictions`` (prediction records) against ``ground_truth`` ({name: item}).

    Every ground-truth image is scored; one without a prediction counts as an empty prediction
    (``num_missing``); predictions without ground truth are listed under ``extra_predictions``.
    Refused with a DataError naming the image, before any metric: a mask that is not a well-formed RLE,
    two records for one image, predictions of other images with a ground-truth name (``image_root``: the
    folder the predictions were made on; legion.eval.ground_truth.check_matching). ``matching``: the
    predictions already matched to ``ground_truth`` and checked (``predictions`` and ``image_root`` then
    unused)."""
    if both_empty not in FG_BOTH_EMPTY:
        raise ValueError(f"unknown both-empty convention {both_empty!r}; choose one of {sorted(FG_BOTH_EMPTY)}")
    names = list(ground_truth)
    if matching is None:
        matching = match_predictions(predictions, ground_truth, image_root)
        check_matching(matching)
    for record in matching.by_name.values():
        check_record_masks(record)
    jobs, unscorable = [], []
    for n in names:
        item, record = ground_truth[n], matching.by_name.get(n)
        if item.size is None and item.union_rle is None and not (record and record.height and record.width):
            unscorable.append(n)  # no image file to read the size from, and no prediction giving it
            continue
        jobs.append((item, record, mask_pairing))
    if unscorable:
        warnings.warn(
            f"{len(unscorable)} ground-truth images have no known size (image file not found and no "
            f"prediction) and are not scored, e.g. {unscorable[0]}; pass --images",
            stacklevel=2,
        )
    scores = _run(jobs, workers, progress)

    metrics = {
        "dataset": dataset,
        "protocol": {
            "gt_raster": ground_truth_raster(ground_truth.values()),
            "fg_both_empty": both_empty,
            "fg_both_empty_values": {
                "fg_iou": _json_float(FG_BOTH_EMPTY[both_empty][0]),
                "fg_f1": _json_float(FG_BOTH_EMPTY[both_empty][1]),
            },
            "legion": "per-image mean of mIoU=(IoU_bg+IoU_fg)/2 (+1e-6) and pixel F1 (both empty = 1)",
            "giou_ciou_unit": {
                "auto": "per mask where predicted phrases = GT ref sentences (paired by phrase), else per image union",
                "ordered": "per mask (predicted k vs GT artifact k) where the counts agree, else per image union",
                "union": "per image union mask",
            }[mask_pairing],
            "mask_pairing": mask_pairing,
            "images_scored_per_mask": sum(s.pairing == "per_mask" for s in scores),
            "scale": "0-100",
        },
        "overall": summarize(scores, both_empty),
        "by_content_type": breakdown(scores, "content_type", both_empty),
        "by_artifact_category": breakdown(scores, "artifact_category", both_empty),
        "missing_images": matching.missing,
        "unscorable_images": unscorable,
        "extra_predictions": matching.extra,
        "duplicate_predictions": matching.duplicates,
    }
    return LocalizationResult(metrics=metrics, scores=scores)


def ground_truth_raster(items: Iterable[GroundTruthItem]) -> str:
    """How the ground truth became pixels: "paper" or "coco" (``GT_RASTERS``) for drawn polygons or
    boxes, "pixels" when every mask was given as pixels already (RichHF heatmaps, precomputed RLE)."""
    drawn = {item.raster for item in items if item.phrase_polygons is not None or item.boxes is not None}
    if len(drawn) > 1:
        raise ValueError(f"ground truth mixes rasterizations {sorted(drawn)}")
    return drawn.pop() if drawn else "pixels"


def _run(jobs: list[tuple], workers: int, progress: bool) -> list[ImageScore]:
    from tqdm import tqdm

    bar = dict(total=len(jobs), desc="localization", unit="img", disable=not progress)
    if workers <= 1 or len(jobs) < 64:
        return [score_image(*job) for job in tqdm(jobs, **bar)]
    import multiprocessing as mp

    ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
    with ctx.Pool(min(workers, os.cpu_count() or 1)) as pool:
        return list(tqdm(pool.imap(_score_star, jobs, chunksize=16), **bar))
