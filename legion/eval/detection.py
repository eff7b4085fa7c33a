"""Real/fake detection metrics (docs/metrics.md §6, paper Table 5), values 0-100.

Input records: ``{"subset": str, "is_fake": bool, "fake_prob": float}`` (one per image).

* A record is predicted fake when ``fake_prob >= 0.5``: the reference takes the argmax of the
  two logits [fake, real] (class 1 = real), and argmax keeps the first index (fake) on a tie.
* Per-subset accuracy = correct / images of the subset (real and fake together);
  ``mean_accuracy`` = unweighted mean over subsets (the reference eval.py ``avg``).
* AP (not in the paper): sklearn ``average_precision_score`` with fake = positive class and score =
  fake probability (UniversalFakeDetect convention); undefined (None) for a subset holding only
  one class. ``real_accuracy`` / ``fake_accuracy`` are the accuracies on each class alone.
* Paper Table 5 groups subsets into "GANs" and "Diffusion" without naming the members;
  ``TABLE5_COLUMNS`` is our documented guess (docs/data_formats.md §8.4) and group scores are the
  unweighted mean of their members' accuracies.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

import numpy as np

from legion.errors import DataError

FAKE_THRESHOLD = 0.5

# Paper Table 5 column -> test subsets (folder names). GANs / Diffusion membership: unconfirmed.
TABLE5_COLUMNS: dict[str, tuple[str, ...]] = {
    "GANs": ("progan", "cyclegan", "biggan", "stylegan", "gaugan", "stargan"),
    "Deepfakes": ("deepfake",),
    "CRN": ("crn",),
    "IMLE": ("imle",),
    "SITD": ("seeingdark",),
    "SAN": ("san",),
    "Diffusion": (
        "guided",
        "ldm_200",
        "ldm_200_cfg",
        "ldm_100",
        "glide_100_27",
        "glide_50_27",
        "glide_100_10",
        "dalle",
    ),
}


def _group_metrics(is_fake: np.ndarray, fake_prob: np.ndarray) -> dict:
    from sklearn.metrics import average_precision_score

    pred_fake = fake_prob >= FAKE_THRESHOLD
    correct = pred_fake == is_fake
    n_fake, n_real = int(is_fake.sum()), int((~is_fake).sum())
    ap = None
    if n_fake and n_real:
        ap = 100.0 * float(average_precision_score(is_fake.astype(int), fake_prob))
    return {
        "accuracy": 100.0 * float(correct.mean()) if len(correct) else None,
        "ap": ap,
        "real_accuracy": 100.0 * float(correct[~is_fake].mean()) if n_real else None,
        "fake_accuracy": 100.0 * float(correct[is_fake].mean()) if n_fake else None,
        "num_images": int(len(correct)),
        "num_real": n_real,
        "num_fake": n_fake,
    }


def _mean(values) -> float | None:
    values = [v for v in values if v is not None]
    return float(np.mean(values)) if values else None


def detection_metrics(records: Iterable[Mapping], groups: Mapping[str, Iterable[str]] | None = None) -> dict:
    """Per-subset accuracy / AP / real and fake accuracy, their unweighted means, the pooled
    ``overall`` numbers, and (``groups``, default ``TABLE5_COLUMNS``) grouped columns.

    Returns ``{"per_subset": {name: {...}}, "mean_accuracy", "mean_ap", "mean_real_accuracy",
    "mean_fake_accuracy", "overall": {...}, "groups": {column: {"accuracy", "subsets"}},
    "num_subsets", "threshold"}``."""
    by_subset: dict[str, tuple[list[bool], list[float]]] = {}
    for i, rec in enumerate(records):
        try:
            subset, fake, prob = str(rec["subset"]), rec["is_fake"], rec["fake_prob"]
        except KeyError as exc:
            raise DataError(f"detection record {i}: missing field {exc}") from None
        if not isinstance(fake, (bool, np.bool_)):
            raise DataError(f"detection record {i}: is_fake must be a bool, got {fake!r}")
        if prob is None or not math.isfinite(float(prob)) or not 0.0 <= float(prob) <= 1.0:
            raise DataError(f"detection record {i}: fake_prob must be a probability in [0, 1], got {prob!r}")
        labels, probs = by_subset.setdefault(subset, ([], []))
        labels.append(bool(fake))
        probs.append(float(prob))
    if not by_subset:
        raise DataError("detection_metrics: no records")

    per_subset = {
        name: _group_metrics(np.array(labels, dtype=bool), np.array(p, dtype=np.float64))
        for name, (labels, p) in sorted(by_subset.items())
    }
    all_labels = np.concatenate([np.array(labels, dtype=bool) for labels, _ in by_subset.values()])
    all_probs = np.concatenate([np.array(p, dtype=np.float64) for _, p in by_subset.values()])

    group_scores = {}
    for column, members in (TABLE5_COLUMNS if groups is None else groups).items():
        present = [m for m in members if m in per_subset]
        if present:
            group_scores[column] = {
                "accuracy": _mean(per_subset[m]["accuracy"] for m in present),
                "ap": _mean(per_subset[m]["ap"] for m in present),
                "subsets": present,
            }
    return {
        "per_subset": per_subset,
        "mean_accuracy": _mean(s["accuracy"] for s in per_subset.values()),
        "mean_ap": _mean(s["ap"] for s in per_subset.values()),
        "mean_real_accuracy": _mean(s["real_accuracy"] for s in per_subset.values()),
        "mean_fake_accuracy": _mean(s["fake_accuracy"] for s in per_subset.values()),
        "overall": _group_metrics(all_labels, all_probs),
        "groups": group_scores,
        "num_subsets": len(per_subset),
        "threshold": FAKE_THRESHOLD,
        "positive_class": "fake",
        "scale": "0-100",
    }
